"""Per-encoder cache of encoded vectors: encoder names, fingerprints, cache paths, atomic save and load."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qin.embed.encoders import DEFAULT_TEXT_NAME, default_text_model
from qin.runs import file_mode

CACHE_VERSION = 1  # part of every cache key: bump when the encoding code changes what a cached vector means


def encoder_name(folder: Path, role: str) -> str:
    """A file-name-safe encoder name: "text-all-minilm-l6-v2", "image-clip-vit-base-patch32"."""
    name = DEFAULT_TEXT_NAME if folder.resolve() == default_text_model().resolve() else folder.resolve().name
    return f"{role}-" + (re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "model")


def model_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a model folder: its config files' text, and its weight files' names and sizes."""
    configs = {p.name: p.read_text(errors="replace") for p in sorted(folder.glob("*.json"))}
    weights = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
               if p.suffix in {".safetensors", ".bin", ".pt", ".h5", ".msgpack"}}
    return {"configs": configs, "weights": weights}


def images_fingerprint(paths: list[Path]) -> str:
    """A hash of which cover files exist, with their sizes and modification times (stat only)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path.name}:-\n".encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, name: str, key: dict[str, Any]) -> Path:
    """Where an encoder's vectors are cached: <cache_dir>/<name>-<first 16 hex of the key's sha256>.npy."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{digest}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_vectors(path: Path, n_items: int, encode: Callable[[], np.ndarray]) -> np.ndarray:
    """The (N, D) vectors cached at `path`, or `encode()`'s, then cached (atomically) for next time."""
    vectors = _load_cached(path, n_items)
    if vectors is None:
        vectors = encode()
        _save_atomic(path, vectors)
    return vectors


def _load_cached(path: Path, n_items: int) -> np.ndarray | None:
    """A cached (N, D) matrix, or None when absent or unusable (it is then re-encoded and rewritten)."""
    if not path.is_file():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError):
        return None
    return array if array.ndim == 2 and array.shape[0] == n_items else None
