"""Parquet writers (the challenge's layout, as `qin synth` writes it) and the safe install of the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qin import layout
from qin.layout import DATA_SUBDIR, HIDDEN_SUBDIR, ROW_FIELDS
from qin.loggen.items import TAGS_PER_ITEM, ItemTruth
from qin.loggen.rows import Rows
from qin.loggen.timelines import Timelines, padded_histories

GENERATOR_NAME = "loggen"  # meta.json's "generator" (one of qin.layout.GENERATOR_NAMES)
OUTPUTS = (DATA_SUBDIR, HIDDEN_SUBDIR)  # everything generate_logs writes into out_dir
TOOL = "loggen"  # the prefix of its error messages


def fixed_list_array(flat: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
    """A plain list<value_type> array of rows of fixed ``width`` from a flat buffer (n*width,)."""
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), width)
    return fixed.cast(pa.list_(value_type))


def write_split(path: Path, idx: np.ndarray, labels: np.ndarray | None, with_id: bool, rows: Rows,
                timelines: Timelines, items: ItemTruth, seq_len: int, chunk_rows: int) -> None:
    """One of train/valid/test in row groups of chunk_rows; idx: (n,) indices into rows, in output order."""
    fields = ([pa.field("ID", pa.int64())] if with_id else []) + ROW_FIELDS
    if labels is not None:
        fields.append(pa.field("label", pa.float64()))
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, idx.size, chunk_rows):
            part = idx[lo : lo + chunk_rows]
            target = rows.item[part]
            seq = padded_histories(timelines, rows.user[part], seq_len)  # (c, S)
            ids = np.arange(lo, lo + part.size, dtype=np.int64)
            cols: list[pa.Array] = [pa.array(ids)] if with_id else []
            cols += [pa.array(timelines.user_id[rows.user[part]]),
                     fixed_list_array(seq.ravel(), seq_len, pa.int64()), pa.array(target),
                     pa.array(items.likes_level[target]), pa.array(items.views_level[target])]
            if labels is not None:
                cols.append(pa.array(labels[lo : lo + part.size]))
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))


def write_item_info(path: Path, items: ItemTruth, emb: np.ndarray) -> None:
    """item_info.parquet: item_id 0..N (row 0 = padding), item_tags list[5], item_emb_d128 list[128]."""
    table = pa.table({"item_id": np.arange(emb.shape[0], dtype=np.int64),
                      "item_tags": fixed_list_array(items.tags.ravel(), TAGS_PER_ITEM, pa.int64()),
                      "item_emb_d128": fixed_list_array(emb.ravel(), emb.shape[1], pa.float64())})
    pq.write_table(table, path, compression="zstd")


def write_hidden(folder: Path, p_valid: np.ndarray, p_test: np.ndarray, y_test: np.ndarray,
                 meta: dict) -> None:
    """valid_truth (row, p_true), test_truth (ID, label, p_true) and meta.json."""
    pq.write_table(pa.table({"row": np.arange(p_valid.size, dtype=np.int64), "p_true": p_valid}),
                   folder / "valid_truth.parquet")
    test_ids = np.arange(p_test.size, dtype=np.int64)
    pq.write_table(pa.table({"ID": test_ids, "label": y_test, "p_true": p_test}),
                   folder / "test_truth.parquet")
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, a path that is a file, lies under a file, or holds entries qin did not write.

    An existing folder is accepted when it is empty, or when hidden/meta.json proves that an earlier
    `qin synth` run (either generator) wrote every output name it holds and its hidden/files.txt lists
    every file under them; see `qin.layout.check_out_dir`.
    """
    layout.check_out_dir(out_dir, TOOL)


def install(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs from tmp into out_dir (each move a rename), replacing an earlier run's.

    Writes tmp/hidden/files.txt first and checks out_dir again (`qin.layout.install_outputs`).
    """
    layout.install_outputs(tmp, out_dir, TOOL)
