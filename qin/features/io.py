"""Reading raw challenge files and reading/writing the feature folder (the contract with training).

Feature folder layout (N rows in a split, V items, L = max_len, D = mm_dim, T = tags_per_item):

    <feature_dir>/manifest.json
    <feature_dir>/items/item_tags.npy      int32   (V, T)   row i = item i
    <feature_dir>/items/item_emb.npy       float32 (V, D)   row i = item i (row 0 as in the input)
    <feature_dir>/<split>/item_id.npy      int32   (N,)
    <feature_dir>/<split>/history.npy      int32   (N, L)   last L non-zero history items, most recent
                                                            last, LEFT-padded with 0
    <feature_dir>/<split>/likes_level.npy  int8    (N,)     raw level + 1 (1..10); 0 = padding
    <feature_dir>/<split>/views_level.npy  int8    (N,)     same encoding
    <feature_dir>/<split>/label.npy        float32 (N,)     train/valid only
    <feature_dir>/<split>/user_id.npy      int64   (N,)
    <feature_dir>/test/ID.npy              int64   (N,)

Arrays are plain `.npy` files so that training can memory-map them (`np.load(mmap_mode="r")`) and
slice batches without ever holding the 3.6M-row train split in RAM.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from qin.errors import QinError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "valid", "test")
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
_ZERO_BLOCK = 8 * 1024 * 1024  # 8 MiB of zeros per write() when posix_fallocate is unavailable

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


def open_array(path: Path, dtype: np.dtype[Any] | type, shape: tuple[int, ...]) -> np.memmap:
    """Create a preallocated ``.npy`` file and return it as a writable memory map.

    Chunks are written straight into the file, so a split never has to exist in RAM as a whole.
    The file's data blocks are reserved up front (`reserve_blocks`): `open_memmap` makes a sparse
    file, and a page written through the map on a full disk is a SIGBUS that kills the process
    (exit 135, temp folder left behind) instead of an OSError.

    Raises:
        OSError: the file cannot be created or its blocks reserved (ENOSPC on a full disk), with
            ``filename`` set.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    reserve_blocks(path, array.offset, array.nbytes)
    return array


def reserve_blocks(path: Path, offset: int, length: int) -> None:
    """Allocate disk blocks for bytes ``[offset, offset + length)`` of an existing file.

    `os.posix_fallocate` reserves them without writing (fast: ext4/xfs/tmpfs mark the extents as
    unwritten), so a full disk fails here with ENOSPC. Where it is missing (macOS) or the file
    system refuses it (EOPNOTSUPP, EINVAL) the range is filled with zeros by plain writes instead:
    a full extra write of the file, acceptable as a fallback only. Neither helps on file systems that
    compress zero blocks away or defer allocation to close (ZFS with compression, some NFS); there a
    full disk can still end in SIGBUS.
    """
    if length == 0:
        return
    try:
        with path.open("r+b") as handle:
            fallocate = getattr(os, "posix_fallocate", None)
            if fallocate is not None:
                try:
                    fallocate(handle.fileno(), offset, length)
                    return
                except OSError as error:
                    if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
            handle.seek(offset)
            zeros = bytes(min(_ZERO_BLOCK, length))
            for start in range(0, length, len(zeros)):
                handle.write(zeros[: min(len(zeros), length - start)])
    except OSError as error:
        if error.filename is not None:
            raise
        # fallocate() and write() name no file; the message should.
        raise OSError(error.errno, error.strerror, str(path)) from error


def write_manifest(feature_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (pretty-printed: people read it to check what a folder holds)."""
    (feature_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(feature_dir: Path) -> dict[str, Any]:
    """Parse ``manifest.json`` and check its format version.

    Raises:
        QinError: naming the folder, when it or its manifest is missing, unreadable or of another
            format version.
    """
    if not feature_dir.is_dir():
        raise QinError(f"{feature_dir}: feature folder not found (run `qin preprocess` first)")
    path = feature_dir / MANIFEST
    if not path.is_file():
        raise QinError(f"{feature_dir}: no {MANIFEST} (not a feature folder, or an interrupted build)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QinError(f"{path}: cannot parse the manifest ({exc})") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise QinError(
            f"{feature_dir}: manifest format_version {version!r}, this qin reads {FORMAT_VERSION} "
            "(rebuild it with `qin preprocess --force`)"
        )
    return manifest


@dataclass(frozen=True)
class SplitArrays:
    """One split's memory-mapped arrays (N rows, L = max_len).

    Attributes:
        item_id: int32 (N,) target item, 1..V-1.
        history: int32 (N, L) most recent item last, left-padded with 0.
        likes_level: int8 (N,) raw level + 1 (1..10), 0 reserved for padding.
        views_level: int8 (N,) same encoding.
        user_id: int64 (N,) only for grouping (GAUC), not a model feature.
        label: float32 (N,) 0/1, or None for the test split.
        ids: int64 (N,) the submission key ``ID`` for the test split, else None.
    """

    item_id: np.ndarray
    history: np.ndarray
    likes_level: np.ndarray
    views_level: np.ndarray
    user_id: np.ndarray
    label: np.ndarray | None
    ids: np.ndarray | None


@dataclass(frozen=True)
class FeatureSet:
    """A loaded feature folder: manifest, item tables (V rows) and access to each split.

    Attributes:
        dir: the feature folder.
        manifest: the parsed ``manifest.json``.
        item_tags: int32 (V, T) memory-mapped tag ids, 0 = padding.
        item_emb: float32 (V, D) memory-mapped frozen multimodal embeddings.
    """

    dir: Path
    manifest: dict[str, Any]
    item_tags: np.ndarray
    item_emb: np.ndarray

    def split(self, name: str) -> SplitArrays:
        """Memory-map the arrays of split ``name`` ("train", "valid" or "test").

        Raises:
            QinError: the split is not in this folder, one of its files is missing or unreadable, or
                an array's rows differ from the manifest's ``rows`` for the split (or history's width
                from ``max_len``): a file replaced by hand would otherwise fail later, mid-batch, as
                an IndexError naming no file.
        """
        splits = self.manifest.get("splits", {})
        if name not in splits:
            raise QinError(f"{self.dir}: no split {name!r} (have: {', '.join(splits)})")
        folder = self.dir / name
        info = splits[name]
        rows = info.get("rows")
        which = f"the manifest's rows for split {name!r}"

        def load(file: str, width: int | None = None) -> np.ndarray:
            return _load(folder / f"{file}.npy", rows, which, width, "the manifest's max_len")

        return SplitArrays(
            item_id=load("item_id"),
            history=load("history", self.manifest.get("max_len")),
            likes_level=load("likes_level"),
            views_level=load("views_level"),
            user_id=load("user_id"),
            label=load("label") if info.get("has_label") else None,
            ids=load("ID") if name == "test" else None,
        )


_REBUILD = "the feature folder is damaged, rebuild it with `qin preprocess --force`"


def _load(
    path: Path,
    rows: int | None = None,
    rows_from: str = "",
    width: int | None = None,
    width_from: str = "",
) -> np.ndarray:
    """Memory-map one ``.npy`` file read-only, with an error naming it if it is missing or damaged.

    Args:
        path: the array file.
        rows: the first dimension it must have (None, or not an int in a hand-edited manifest: not
            checked).
        rows_from: where ``rows`` comes from, for the message.
        width: the second dimension it must have (None: not checked).
        width_from: where ``width`` comes from, for the message.
    """
    if not path.is_file():
        raise QinError(f"{path}: missing from the feature folder (rebuild with `qin preprocess --force`)")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as error:  # a truncated or overwritten array file
        raise QinError(f"{path}: not a readable .npy array ({error}); {_REBUILD}") from error
    if isinstance(rows, int) and (array.ndim == 0 or array.shape[0] != rows):
        have = f"{array.shape[0]:,} rows" if array.ndim else "a scalar (0 dimensions)"
        raise QinError(f"{path}: {have}, expected {rows:,} ({rows_from}); {_REBUILD}")
    if isinstance(width, int) and (array.ndim != 2 or array.shape[1] != width):
        have = f"{array.shape[1]:,} columns" if array.ndim == 2 else f"shape {array.shape}"
        raise QinError(f"{path}: {have}, expected {width:,} ({width_from}); {_REBUILD}")
    return array


def load_features(feature_dir: Path) -> FeatureSet:
    """Open a feature folder written by `build_features` (arrays are memory-mapped, not read).

    Raises:
        QinError: naming the folder if it or its manifest is missing or has a wrong format_version;
            naming the file if an item table is missing, unreadable, or its rows differ from the
            manifest's ``item_vocab`` (or its width from ``tags_per_item`` / ``mm_dim``).
    """
    feature_dir = Path(feature_dir)
    manifest = read_manifest(feature_dir)
    items = feature_dir / "items"
    vocab = manifest.get("item_vocab")
    return FeatureSet(
        dir=feature_dir,
        manifest=manifest,
        item_tags=_load(items / "item_tags.npy", vocab, "the manifest's item_vocab",
                        manifest.get("tags_per_item"), "the manifest's tags_per_item"),
        item_emb=_load(items / "item_emb.npy", vocab, "the manifest's item_vocab",
                       manifest.get("mm_dim"), "the manifest's mm_dim"),
    )
