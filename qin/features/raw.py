"""Reading the raw challenge files: column names, input checks, hashing, schema, row counts and slices.

The raw inputs are ``train.parquet``, ``valid.parquet``, ``test.parquet`` and ``item_info.parquet``.
Columns are read by NAME, never by position (the column order of test.parquet is not known). Every
failed read becomes a one-line `QinError` naming the file (`reading_parquet`). What is done with the
rows (checks, encoding) lives in `validate.py` and `steps.py`; the folder they are written to, in `io.py`.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from qin.errors import QinError

ITEM_INFO = "item_info.parquet"

# Raw column names (read by NAME, never by position: the column order of test.parquet is not known).
USER_ID = "user_id"
ITEM_SEQ = "item_seq"
ITEM_ID = "item_id"
LIKES_LEVEL = "likes_level"
VIEWS_LEVEL = "views_level"
LABEL = "label"
ID = "ID"
ITEM_TAGS = "item_tags"
ITEM_EMB = "item_emb_d128"

_HASH_BLOCK = 8 * 1024 * 1024  # 8 MiB: streaming hash of multi-GB files in constant memory

# What a failed read of a raw file raises: polars errors (a corrupt page is a ComputeError), a panic
# in polars' decoder (PanicException derives from BaseException, not Exception), pyarrow errors and
# OS errors (EIO, a file removed while the build runs).
_READ_ERRORS: tuple[type[BaseException], ...] = (
    pl.exceptions.PolarsError,
    pl.exceptions.PanicException,
    pa.ArrowException,
    OSError,
)


def split_file(raw_dir: Path, split: str) -> Path:
    """The raw parquet file of one split, e.g. ``raw_dir/train.parquet``."""
    return raw_dir / f"{split}.parquet"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 8 MiB blocks so memory stays flat for any file size."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def source_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of one input file: resolved path, size in bytes and sha256."""
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": sha256_file(path)}


def check_input_file(path: Path) -> None:
    """Refuse a raw input that is not a regular file, saying what it is instead.

    Raises:
        QinError: ``<path>: file not found``, ``<path>: is a folder, not a parquet file`` or
            ``<path>: is not a regular file (a fifo)`` (a socket, a device, ...).
    """
    try:
        mode = path.stat().st_mode  # follows symlinks: a link to a parquet file is fine
    except OSError:  # missing, a dangling link, an unsearchable parent
        raise QinError(f"{path}: file not found") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise QinError(f"{path}: is a folder, not a parquet file")
    raise QinError(f"{path}: is not a regular file ({_file_kind(mode)})")


def _file_kind(mode: int) -> str:
    """What a non-regular, non-folder file is, in words."""
    kinds = [
        (stat.S_ISFIFO, "a fifo"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_schema(path: Path) -> pl.Schema:
    """Column names and dtypes from the parquet footer (no data is read).

    Raises:
        QinError: the file is missing, is not a regular file (`check_input_file`) or is not a
            readable parquet file.
    """
    check_input_file(path)
    try:
        return pl.scan_parquet(path).collect_schema()
    except Exception as exc:  # polars raises several error types for a corrupt footer
        raise QinError(f"{path}: cannot read as parquet ({_first_line(exc)})") from exc


@contextmanager
def reading_parquet(path: Path) -> Iterator[None]:
    """Turn a failed read of the raw file ``path`` into a one-line `QinError` naming the file.

    A corrupt page behind an intact footer passes `read_schema` and fails only when the page is
    decoded, as a ~40-line polars traceback that names no file. Wrap only reads in this: an error
    in a computation on data already in memory is a bug and keeps its traceback.
    """
    try:
        yield
    except _READ_ERRORS as exc:
        raise QinError(f"{path}: cannot read as parquet ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message (polars appends multi-line context)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def count_rows(path: Path) -> int:
    """Row count from the parquet metadata (polars answers `pl.len()` without decoding columns)."""
    with reading_parquet(path):
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())


def row_slices(n_rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """(offset, length) pairs that cover ``n_rows`` in order, each at most ``chunk_rows`` long."""
    return [(offset, min(chunk_rows, n_rows - offset)) for offset in range(0, n_rows, chunk_rows)]


def read_slice(path: Path, columns: list[pl.Expr], offset: int, length: int) -> pl.DataFrame:
    """Rows ``[offset, offset + length)`` of a parquet file, selected by the given expressions.

    The slice is pushed down into the parquet reader by the streaming engine, so only the row
    groups (and pages) that overlap the slice are decoded: memory is bounded by the chunk size.

    Raises:
        QinError: naming the file, when a page cannot be read or decoded.
    """
    with reading_parquet(path):
        return pl.scan_parquet(path).slice(offset, length).select(columns).collect(engine="streaming")
