"""The feature folder format (the contract with training): manifest, array files, `load_features`.

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
slice batches without ever holding the 3.6M-row train split in RAM. Writing: `open_array` (a
preallocated, block-reserved memory map) and `write_manifest`; reading: `load_features` ->
`FeatureSet` -> `SplitArrays`. Reading the raw challenge files is `raw.py`'s.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qin.errors import QinError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "valid", "test")

_ZERO_BLOCK = 8 * 1024 * 1024  # 8 MiB of zeros per write() when posix_fallocate is unavailable


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