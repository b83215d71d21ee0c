"""Parquet writers: train/valid/test, item_seq, the item files and the hidden truth files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qin.layout import ROW_FIELDS
from qin.synth.items import Items
from qin.synth.params import (
    DATA_SUBDIR,
    EMB_DIM,
    EMB_VARIANTS,
    IMG_DIM,
    N_ITEM_TAGS,
    TXT_DIM,
    SizeSpec,
    SynthParams,
)
from qin.synth.rows import Rows
from qin.synth.users import Users, padded_history


def _list_array(flat: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
    """A plain list<value_type> array of rows of fixed ``width`` from a flat buffer (n*width,)."""
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), width)
    return fixed.cast(pa.list_(value_type))


def _ragged_list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array from a flat buffer and per-row lengths (n,)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


def write_split(path: Path, idx: np.ndarray, labels: np.ndarray | None, with_id: bool, rows: Rows,
                users: Users, items: Items, spec: SizeSpec, on_chunk: Callable[[int], None]) -> None:
    """Write one of train/valid/test in row groups of spec.chunk_rows.

    Args:
        idx: (n,) indices into ``rows`` in output order.  labels: (n,) float64 or None (no label column).
    """
    fields = ([pa.field("ID", pa.int64())] if with_id else []) + ROW_FIELDS
    if labels is not None:
        fields.append(pa.field("label", pa.float64()))
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, idx.size, spec.chunk_rows):
            ci = idx[lo : lo + spec.chunk_rows]
            t = rows.item[ci]
            cols: list[pa.Array] = []
            if with_id:
                cols.append(pa.array(np.arange(lo, lo + ci.size, dtype=np.int64)))
            seq = padded_history(users, rows.user[ci], spec.seq_len)  # (c, S)
            cols += [pa.array(users.user_id[rows.user[ci]]),
                     _list_array(seq.ravel(), spec.seq_len, pa.int64()),
                     pa.array(t), pa.array(items.likes_level[t]), pa.array(items.views_level[t])]
            if labels is not None:
                cols.append(pa.array(labels[lo : lo + ci.size]))
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            on_chunk(ci.size)


def write_item_seq(path: Path, users: Users, prm: SynthParams) -> int:
    """item_seq.parquet: for every user (in user_id order), the last few prefixes of the history.

    Lists are unpadded (variable length, oldest first). Returns the number of rows written.
    """
    schema = pa.schema([pa.field("user_id", pa.int64()), pa.field("item_seq", pa.list_(pa.int64()))])
    order = np.argsort(users.user_id)
    written = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, order.size, 100_000):
            us = order[lo : lo + 100_000]
            L = users.hist_len[us]
            m = np.minimum(L, prm.prefixes_per_user)  # prefixes per user
            ru = np.repeat(np.arange(us.size), m)  # (R,) row → user position
            k = np.arange(ru.size) - np.repeat(np.cumsum(m) - m, m)
            plen = L[ru] - m[ru] + 1 + k  # prefix lengths, increasing within a user  (R,)
            rr = np.repeat(np.arange(ru.size), plen)
            within = np.arange(rr.size) - np.repeat(np.cumsum(plen) - plen, plen)
            flat = users.hist_flat[users.hist_off[us[ru]][rr] + within]
            table = pa.Table.from_arrays(
                [pa.array(users.user_id[us[ru]]), _ragged_list_array(flat, plen, pa.int64())], schema=schema)
            writer.write_table(table)
            written += ru.size
    return written


def write_items(folder: Path, items: Items, titles: pa.Array, txt: np.ndarray, img: np.ndarray,
                emb: np.ndarray, variants: list[np.ndarray]) -> None:
    """item_info.parquet (row 0 = padding), item_feature.parquet and item_emb.parquet."""
    n = items.topic.size - 1
    ids = np.arange(n + 1, dtype=np.int64)
    emb0 = np.concatenate([np.zeros((1, EMB_DIM)), emb])  # (N+1, 128) float64
    info = pa.table({"item_id": ids,
                     "item_tags": _list_array(items.tags.ravel(), N_ITEM_TAGS, pa.int64()),
                     "item_emb_d128": _list_array(emb0.ravel(), EMB_DIM, pa.float64())})
    pq.write_table(info, folder / DATA_SUBDIR / "item_info.parquet", compression="zstd")

    tags = items.tags[1:]
    n_tags = (tags != 0).sum(axis=1)
    schema = pa.schema([
        pa.field("item_id", pa.int64()), pa.field("item_title", pa.string()),
        pa.field("item_tags", pa.list_(pa.int64())), pa.field("likes_level", pa.int64()),
        pa.field("views_level", pa.int64()), pa.field("txt_emb_BERT", pa.list_(pa.float32())),
        pa.field("img_emb_CLIPRN50", pa.list_(pa.float32()))])
    step = 16384  # ~115 MB of vectors per row group
    with pq.ParquetWriter(folder / "item_feature.parquet", schema, compression="zstd") as writer:
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            m = tags[sl].shape[0]
            cols = [pa.array(ids[1:][sl]), titles.slice(lo, m),
                    _ragged_list_array(tags[sl][tags[sl] != 0], n_tags[sl], pa.int64()),
                    pa.array(items.likes_level[1:][sl]), pa.array(items.views_level[1:][sl]),
                    _list_array(txt[sl].ravel(), TXT_DIM, pa.float32()),
                    _list_array(img[sl].ravel(), IMG_DIM, pa.float32())]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))

    emb_cols: dict[str, Any] = {"item_id": ids[1:]}
    for name, arr in zip(EMB_VARIANTS, variants, strict=True):
        emb_cols[name] = _list_array(arr.ravel(), EMB_DIM, pa.float32())
    pq.write_table(pa.table(emb_cols), folder / "item_emb.parquet", compression="zstd")


def write_hidden(folder: Path, items: Items, p_valid: np.ndarray, p_test: np.ndarray,
                 y_test: np.ndarray) -> None:
    """Truth files: valid p_true by row, test label and p_true by ID, and item latents for analysis."""
    pq.write_table(pa.table({"row": np.arange(p_valid.size, dtype=np.int64), "p_true": p_valid}),
                   folder / "valid_truth.parquet")
    ids = np.arange(p_test.size, dtype=np.int64)
    pq.write_table(pa.table({"ID": ids, "label": y_test, "p_true": p_test}),
                   folder / "test_truth.parquet")
    n = items.topic.size - 1
    pq.write_table(pa.table({
        "item_id": np.arange(1, n + 1, dtype=np.int64),
        "topic": items.topic[1:],
        "log_pop": items.log_pop[1:],
        "w_item": items.w_item[1:],
        "v": _list_array(items.v[1:].ravel(), items.v.shape[1], pa.float32()),
        "content": _list_array(items.content[1:].ravel(), items.v.shape[1], pa.float32()),
    }), folder / "item_latent.parquet", compression="zstd")
