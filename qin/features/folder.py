"""Where a feature folder lives, and whether it is up to date.

`feature_dir_for` names the folder from the raw folder, max_len and an optional item table (cutting
a name too long for the file system); `feature_dir_of` does so for a `DataConfig`. `up_to_date` says
whether an existing folder was built from the same inputs and config and is still whole, which makes
a rebuild a no-op.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qin.errors import QinError
from qin.features.io import SPLITS, read_manifest
from qin.features.raw import check_input_file, sha256_file

if TYPE_CHECKING:
    from qin.config import DataConfig

# File names hold at most 255 bytes (ext4, xfs, btrfs, tmpfs, APFS), and the build adds ``.tmp-<pid>`` /
# ``.old-<pid>`` (12 bytes with a 7-digit pid, Linux's largest). A name that fits with that suffix is
# kept as it always was (existing feature folders keep their names); a longer one has its readable
# part cut so that it is at most _SHORT_NAME_BYTES, leaving room for the suffix.
_NAME_MAX_BYTES = 255
_SUFFIX_BYTES = len(".tmp-4194304")
_SHORT_NAME_BYTES = 180


def feature_dir_for(features_root: Path, raw_dir: Path, max_len: int, item_info: Path | None) -> Path:
    """Deterministic feature folder for a raw folder and config,
    e.g. ``features/demo-MicroLens_1M_x1-L32-1a2b3c``.

    An item_info override adds ``-ii<8 hex>``, a hash of its resolved path and content, so two
    embedding tables built side by side never share (and keep rebuilding) one folder.

    A name too long for the file system (with the ``.tmp-<pid>`` suffix the build adds) has its
    readable ``<parent>-<raw name>`` part cut to fit in 180 bytes of UTF-8; the hashes, of the full
    path, keep it unique. Names that fit are never changed.
    """
    # The parent folder is part of the name (data/demo vs data/), hashed with the resolved path, so
    # two data sets with the challenge's folder name never share (and keep rebuilding) one folder.
    raw_dir = Path(raw_dir)
    place = hashlib.sha256(str(raw_dir.resolve()).encode()).hexdigest()[:6]
    tail = f"-L{max_len}-{place}"
    if item_info is not None:
        item_info = Path(item_info)
        check_input_file(item_info)
        digest = hashlib.sha256(f"{item_info.resolve()}\n{sha256_file(item_info)}".encode()).hexdigest()
        tail += f"-ii{digest[:8]}"
    return Path(features_root) / _fitting_name(raw_dir.resolve().parent.name, raw_dir.name, tail)


def feature_dir_of(data: DataConfig) -> Path:
    """The feature folder of a data config (`feature_dir_for` of its fields; an empty item_info is none).

    Callers that need the folder of a config use this rather than rebuilding the call themselves.
    """
    item_info = Path(data.item_info) if data.item_info else None
    return feature_dir_for(Path(data.features_root), Path(data.raw_dir), data.max_len, item_info)


def _fitting_name(parent: str, raw: str, tail: str) -> str:
    """``<parent>-<raw><tail>``, with parent and raw cut (the longer one first) when it is too long."""
    name = f"{parent}-{raw}{tail}"
    if _bytes(name) + _SUFFIX_BYTES <= _NAME_MAX_BYTES:
        return name
    budget = max(0, _SHORT_NAME_BYTES - _bytes(tail) - 1)  # bytes for parent and raw together
    raw_bytes = min(_bytes(raw), max(budget // 2, budget - _bytes(parent)))
    return f"{_cut(parent, budget - raw_bytes)}-{_cut(raw, raw_bytes)}{tail}"


def _bytes(text: str) -> int:
    """Length of a file name on disk (UTF-8; undecodable bytes kept as they were)."""
    return len(os.fsencode(text))


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that is at most ``limit`` bytes, never splitting a character."""
    while _bytes(text) > limit:
        text = text[:-1]
    return text


def up_to_date(out_dir: Path, config: dict[str, Any], sources: dict[str, dict[str, Any]]) -> bool:
    """True when ``out_dir`` is a complete folder built from these exact inputs and config."""
    try:
        manifest = read_manifest(out_dir)
    except QinError:
        return False
    old_sources = manifest.get("sources", {})
    if manifest.get("config") != config or set(old_sources) != set(sources):
        return False
    for name, entry in sources.items():
        old = old_sources[name]
        if old.get("size") != entry["size"] or old.get("sha256") != entry["sha256"]:
            return False
    # A folder someone pruned or damaged by hand is not up to date either: every array must open
    # (its header read through a memory map, no data) with the rows the manifest records.
    # History and the item tables must also be as wide as the manifest says (what `load_features`
    # and `FeatureSet.split` check).
    vocab = manifest.get("item_vocab")
    expected = {
        out_dir / "items" / "item_tags.npy": (vocab, manifest.get("tags_per_item")),
        out_dir / "items" / "item_emb.npy": (vocab, manifest.get("mm_dim")),
    }
    for split, info in manifest.get("splits", {}).items():
        names = ["item_id", "likes_level", "views_level", "user_id"]
        names += ["label"] if info.get("has_label") else []
        names += ["ID"] if split == "test" else []
        expected |= {out_dir / split / f"{name}.npy": (info.get("rows"),) for name in names}
        expected[out_dir / split / "history.npy"] = (info.get("rows"), manifest.get("max_len"))
    return set(manifest.get("splits", {})) == set(SPLITS) and all(
        _array_shape(path)[: len(dims)] == dims for path, dims in expected.items())


def _array_shape(path: Path) -> tuple[int, ...]:
    """Shape of a .npy file whose whole payload is on disk; () when it is missing or damaged."""
    try:
        return tuple(int(n) for n in np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError, EOFError):
        return ()
