"""Reading item_feature / item_info parquet files and writing item tables (row i = item i, row 0 = zeros)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from qin.embed.atomic import atomic_write
from qin.errors import QinError, os_error
from qin.features.raw import ITEM_EMB, ITEM_ID, ITEM_TAGS

ITEM_TITLE = "item_title"
TXT_EMB = "txt_emb_BERT"  # (768,) frozen BERT vector per item, item_feature.parquet
IMG_EMB = "img_emb_CLIPRN50"  # (1024,) frozen CLIP-RN50 vector per item, item_feature.parquet
# Parquet key-value metadata that marks a table `qin embed` wrote: only such a file is ever replaced.
WRITER_KEY, WRITER_VALUE = b"qin.writer", b"qin embed"


def check_embed_output(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an --out that does not end in .parquet, is one of the inputs, is not a regular file, or is a
    file `qin embed` did not write.

    The organisers' item_info.parquet sits next to the default output; replacing it by mistake would
    lose the challenge's own vectors.
    """
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise QinError(f"{out}: the item table is written as parquet; give an --out ending in .parquet")
    if any(out.resolve() == Path(source).resolve() for source in inputs):
        raise QinError(f"{out}: is one of the input files; write the new table to another path")
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise QinError(f"{out}: exists and is not a regular file; choose a file path")
    if out.exists():
        try:
            written_by = (pq.read_schema(out).metadata or {}).get(WRITER_KEY)
        except Exception:  # not parquet at all
            written_by = None
        if written_by != WRITER_VALUE:
            raise QinError(f"{out}: exists and was not written by `qin embed`; not replacing it. "
                           "Move it or choose another --out")


def check_columns(path: Path, columns: Sequence[str]) -> None:
    """QinError naming the file when it is missing, unreadable, or lacks one of ``columns`` (footer only)."""
    if not path.is_file():
        raise QinError(f"{path}: file not found")
    try:
        schema = pl.scan_parquet(path).collect_schema()
    except Exception as exc:  # polars raises several error types for a corrupt footer
        raise QinError(f"{path}: cannot read as parquet ({exc})") from exc
    for column in columns:
        if column not in schema:
            raise QinError(f"{path}: no column {column!r} (has {', '.join(schema.names())})")


def read_checked_parquet(path: Path, columns: Sequence[str] | None = None) -> pl.DataFrame:
    """Named columns (None: all) of a parquet file, after `check_columns`; a corrupt file is a QinError."""
    check_columns(path, columns or [])
    try:
        return pl.read_parquet(path, columns=list(columns) if columns is not None else None)
    except Exception as exc:  # a corrupt page or truncated file: polars raises several error types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QinError(f"{path}: cannot read as parquet ({first_line})") from exc


def read_item_info(path: Path) -> pl.DataFrame:
    """item_info as a frame sorted by item_id, checked to hold exactly the ids 0..N (row i = item i)."""
    info = read_checked_parquet(path)
    for column in (ITEM_ID, ITEM_TAGS):
        if column not in info.columns:
            raise QinError(f"{path}: no column {column!r} (has {', '.join(info.columns)})")
    info = info.sort(ITEM_ID)
    ids = info[ITEM_ID].to_numpy()
    if not np.array_equal(ids, np.arange(ids.size)):
        raise QinError(f"{path}: item_id must be 0..{ids.size - 1} with row 0 = padding (row i = item i)")
    if ids.size < 2:
        raise QinError(f"{path}: no items besides the padding row")
    return info


def item_rows(ids: np.ndarray, n_items: int, path: Path) -> np.ndarray:
    """Rows (0-based, item i -> i - 1) for item_feature ids, checked to be unique and in 1..N."""
    if ids.size and (ids.min() < 1 or ids.max() > n_items):
        raise QinError(f"{path}: item_id outside 1..{n_items} (the ids of item_info)")
    if np.unique(ids).size != ids.size:
        raise QinError(f"{path}: duplicate item_id values")
    return ids.astype(np.int64) - 1


def vector_column(frame: pl.DataFrame, column: str, path: Path) -> np.ndarray:
    """A list<float> column of equal-length rows as an (rows, width) float32 matrix."""
    series = frame[column]
    lengths = series.list.len()
    if lengths.null_count() or lengths.n_unique() != 1:
        raise QinError(f"{path}: column {column!r} must hold vectors of one length, no nulls")
    width = int(lengths[0])
    matrix = series.cast(pl.Array(pl.Float32, width)).to_numpy().reshape(len(frame), width)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad.size:
        raise QinError(f"{path}: column {column!r} holds a NaN, infinite or float32-overflowing value "
                       f"(first bad row {int(bad[0])}, 0-based)")
    return matrix


def vector_width(path: Path, column: str) -> int:
    """Length of the first vector of a list column (reads one row)."""
    first = pl.scan_parquet(path).select(pl.col(column).first().list.len()).collect().item()
    if not first:
        raise QinError(f"{path}: column {column!r} starts with an empty or null vector")
    return int(first)


def write_item_table(info: pl.DataFrame, item_vectors: np.ndarray, out: Path) -> None:
    """Write item_info with item_emb_d128 replaced: list<float32>[d], row 0 zeros, other columns kept.

    Args:
        info: item_info sorted by item_id (N + 1 rows).
        item_vectors: (N, d) vectors of items 1..N.

    The file is written next to ``out`` under a temporary name (``.<name>.<pid>.<random>.tmp``) and
    renamed, so a reader never sees a half-written table; temporaries a killed run left are removed.
    """
    table = np.zeros((item_vectors.shape[0] + 1, item_vectors.shape[1]), dtype=np.float32)  # (N+1, d)
    table[1:] = item_vectors
    emb = pl.Series(ITEM_EMB, table).cast(pl.List(pl.Float32))
    columns = info.columns if ITEM_EMB in info.columns else [*info.columns, ITEM_EMB]
    frame = info.with_columns(emb).select(columns)
    try:
        with atomic_write(out) as tmp:
            table = frame.to_arrow()
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), WRITER_KEY: WRITER_VALUE})
            pq.write_table(table, tmp, compression="zstd")
    except OSError as error:  # pyarrow's write errors often name no file: name the table
        raise os_error(error, doing="writing the item table", path=out) from error
