"""Writing a build's arrays: item tables, then every split in row chunks, into the temp folder.

`write_folder` checks every input's columns first (footer only, so a bad file fails in seconds),
then validates and encodes item_info whole (it is small) and each split chunk by chunk into
preallocated ``.npy`` memory maps, and returns the manifest for the caller to write. Memory is
bounded by the chunk size, never by the split size. Reading is `raw.py`'s, the checks are
`validate.py`'s, the transformations `steps.py`'s and the folder format `io.py`'s.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

import qin
from qin.errors import QinError
from qin.features import steps, validate
from qin.features.io import FORMAT_VERSION, SPLITS, open_array
from qin.features.raw import (
    ID,
    ITEM_EMB,
    ITEM_ID,
    ITEM_INFO,
    ITEM_SEQ,
    ITEM_TAGS,
    LABEL,
    LIKES_LEVEL,
    USER_ID,
    VIEWS_LEVEL,
    count_rows,
    read_slice,
    reading_parquet,
    row_slices,
)

# Small splits first: a bad valid/test file should fail before minutes are spent on train.
BUILD_ORDER: tuple[str, ...] = ("valid", "test", "train")


def write_folder(
    inputs: dict[str, Path],
    out: Path,
    max_len: int,
    chunk_rows: int,
    console: Console,
    config: dict[str, Any],
    sources: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write items/ and every split into ``out``; return the manifest (not yet written)."""
    # Footer-only checks of every file first (cheap), so schema errors anywhere fail fast.
    item_schema = validate.check_columns(inputs[ITEM_INFO], validate.ITEM_INFO_COLUMNS)
    schemas = {
        split: validate.check_columns(_split_path(inputs, split), _required(split)) for split in SPLITS
    }
    n_rows = {}
    for split in SPLITS:
        n_rows[split] = count_rows(_split_path(inputs, split))
        validate.check_not_empty(_split_path(inputs, split), n_rows[split])

    with console.status("item_info: validating and writing item tables"):
        items = _write_items(inputs[ITEM_INFO], item_schema, out / "items")
    console.print(
        f"item_info: {items['item_vocab']} items, tag vocab {items['tag_vocab']}, "
        f"embedding dim {items['mm_dim']}"
    )

    progress = Progress(
        TextColumn("{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=console,
        disable=console.quiet,
    )
    splits: dict[str, dict[str, Any]] = {}
    with progress:
        tasks = {split: progress.add_task(split, total=n_rows[split]) for split in BUILD_ORDER}
        for split in BUILD_ORDER:
            splits[split] = _write_split(
                _split_path(inputs, split),
                split,
                schemas[split],
                n_rows[split],
                out / split,
                items["item_vocab"],
                max_len,
                chunk_rows,
                progress,
                tasks[split],
            )
    return {
        "format_version": FORMAT_VERSION,
        "max_len": max_len,
        **items,
        "level_vocab": steps.LEVEL_VOCAB,
        "splits": {split: splits[split] for split in SPLITS},
        "sources": sources,
        "config": config,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "qin_version": qin.__version__,
    }


def _split_path(inputs: dict[str, Path], split: str) -> Path:
    """The input path of a split from the ``inputs`` table."""
    return inputs[f"{split}.parquet"]


def _required(split: str) -> dict[str, validate.ColumnKind]:
    """Required columns of a split: label on train/valid; ID (and never label) on test."""
    required = dict(validate.SPLIT_COLUMNS)
    if split == "test":
        required[ID] = validate.ColumnKind.INTEGER
    else:
        required[LABEL] = validate.ColumnKind.BINARY
    return required


def _write_items(path: Path, schema: pl.Schema, out: Path) -> dict[str, Any]:
    """Validate item_info and write item_tags.npy int32 (V, 5) and item_emb.npy float32 (V, D).

    item_info is small (V = 91,718 rows, ~90 MB of float64 embeddings at full size), so it is
    read whole rather than chunked.
    """
    validate.check_not_empty(path, count_rows(path))
    emb_dim = validate.first_list_len(path, ITEM_EMB, schema[ITEM_EMB])
    with reading_parquet(path):
        frame = (
            pl.scan_parquet(path)
            .select(
                pl.col(ITEM_ID),
                steps.as_list(ITEM_TAGS, schema[ITEM_TAGS]),
                steps.as_list(ITEM_EMB, schema[ITEM_EMB]),
            )
            .collect(engine="streaming")
        )
    validate.raise_first_bad(path, frame, validate.item_info_checks(emb_dim))
    assert emb_dim is not None  # a null row 0 embedding failed the checks above
    tags = steps.fixed_width_matrix(frame[ITEM_TAGS], validate.TAGS_PER_ITEM, np.int32)  # (V, 5)
    emb = steps.fixed_width_matrix(frame[ITEM_EMB], emb_dim, np.float32)  # (V, D)
    out.mkdir(parents=True)
    np.save(out / "item_tags.npy", tags)
    np.save(out / "item_emb.npy", emb)
    return {
        "item_vocab": frame.height,
        "tag_vocab": steps.tag_vocab(int(tags.max())),
        "tags_per_item": validate.TAGS_PER_ITEM,
        "mm_dim": emb_dim,
    }


def _write_split(
    path: Path,
    split: str,
    schema: pl.Schema,
    n_rows: int,
    out: Path,
    n_items: int,
    max_len: int,
    chunk_rows: int,
    progress: Progress,
    task: TaskID,
) -> dict[str, Any]:
    """Validate and encode one split chunk by chunk into ``out/*.npy``; return its manifest entry."""
    has_label = split != "test"
    has_id = split == "test"
    seq_len = validate.first_list_len(path, ITEM_SEQ, schema[ITEM_SEQ])
    checks = validate.split_checks(n_items, seq_len, has_label) + (validate.id_checks() if has_id else [])
    raw_columns = [
        pl.col(USER_ID),
        steps.as_list(ITEM_SEQ, schema[ITEM_SEQ]),
        pl.col(ITEM_ID),
        pl.col(LIKES_LEVEL),
        pl.col(VIEWS_LEVEL),
    ]
    raw_columns += [pl.col(LABEL)] if has_label else []
    raw_columns += [pl.col(ID)] if has_id else []
    encode = steps.split_columns(max_len, has_label, has_id)

    # Preallocated memory maps: each chunk is written at its offset and leaves RAM afterwards.
    arrays: dict[str, np.memmap] = {
        ITEM_ID: open_array(out / "item_id.npy", np.int32, (n_rows,)),
        "history": open_array(out / "history.npy", np.int32, (n_rows, max_len)),
        LIKES_LEVEL: open_array(out / "likes_level.npy", np.int8, (n_rows,)),
        VIEWS_LEVEL: open_array(out / "views_level.npy", np.int8, (n_rows,)),
        USER_ID: open_array(out / "user_id.npy", np.int64, (n_rows,)),
    }
    if has_label:
        arrays[LABEL] = open_array(out / "label.npy", np.float32, (n_rows,))
    if has_id:
        arrays[ID] = open_array(out / "ID.npy", np.int64, (n_rows,))

    start = time.perf_counter()
    kept_items = 0
    positives = 0  # counted exactly (a float32 sum of millions of labels would round)
    for offset, length in row_slices(n_rows, chunk_rows):
        raw = read_slice(path, raw_columns, offset, length)
        if raw.height != length:  # the file changed under us, or a reader bug: never write a gap
            raise QinError(f"{path}: expected {length} rows at row {offset}, read {raw.height}")
        validate.raise_first_bad(path, raw, checks, offset)
        encoded = raw.lazy().select(encode).collect()
        history, lengths = steps.left_pad(encoded["history"], max_len)  # (n, L), (n,)
        end = offset + length
        arrays["history"][offset:end] = history
        for name in arrays.keys() - {"history"}:
            arrays[name][offset:end] = encoded[name].to_numpy()
        kept_items += int(lengths.sum())
        if has_label:
            positives += int((encoded[LABEL] == 1).sum())
        progress.advance(task, length)
    if has_label:
        _check_two_classes(path, split, positives, n_rows)
    for array in arrays.values():
        array.flush()
    del arrays
    # A plain line per split too: progress bars do not show in logs written to a file.
    progress.console.print(
        f"{split}: {n_rows:,} rows, mean history {kept_items / n_rows:.2f} of {max_len} kept "
        f"(input length {seq_len}), {time.perf_counter() - start:.1f} s"
    )

    return {
        "rows": n_rows,
        "has_label": has_label,
        "mean_history_len": kept_items / n_rows,  # non-zero items kept per row, after truncation to L
        "positive_rate": positives / n_rows if has_label else None,
        "input_seq_len": seq_len,  # S, the stored history length of the input file
    }


def _check_two_classes(path: Path, split: str, positives: int, n_rows: int) -> None:
    """Refuse a labelled split whose labels are all 0 or all 1.

    On valid, AUC (the challenge metric, and what early stopping and model selection watch) is
    undefined, so training would run for nothing; on train, the model never sees the other class.
    """
    if 0 < positives < n_rows:
        return
    value = 1 if positives == n_rows else 0
    if split == "valid":
        why = (
            "validation AUC is undefined, so early stopping and model selection would have nothing "
            "to measure; use a validation split with both clicks (1) and non-clicks (0)"
        )
    else:
        why = (
            "the model needs both clicks (1) and non-clicks (0) to learn; raw positive-only logs, "
            "for example, need negatives sampled into them first"
        )
    raise QinError(f"{path}: column '{LABEL}' holds only one class (all {n_rows:,} rows are {value}); {why}")
