"""Per-encoder cache of encoded vectors: encoder names, fingerprints, cache paths, atomic save and load."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qin.embed.atomic import atomic_write
from qin.embed.encoders import DEFAULT_TEXT_NAME, console, default_text_model

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


def checksum_path(path: Path) -> Path:
    """The sidecar that records a cache file's sha256: ``<name>.npy.sha256`` (``sha256sum -c`` format)."""
    return path.with_name(path.name + ".sha256")


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``path`` (.npy), then its sha256 sidecar, each atomically.

    A run killed between the two leaves a cache file without a matching record, which the next load
    discards: a cache entry is only trusted once both are in place.
    """
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
        with open(tmp, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    with atomic_write(checksum_path(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")


def cached_vectors(path: Path, n_items: int, encode: Callable[[], np.ndarray]) -> np.ndarray:
    """The (N, D) vectors cached at `path`, or `encode()`'s, then cached (atomically) for next time.

    A cache entry whose bytes do not match its recorded sha256 (or that has no record, or is unreadable
    or of the wrong shape) is discarded with a one-line note and re-encoded.
    """
    vectors, problem = _load_cached(path, n_items)
    if problem is not None:
        console.print(f"discarded cache entry {path}: {problem}; encoding again", style="yellow",
                      markup=False, highlight=False, soft_wrap=True)
    if vectors is None:
        vectors = encode()
        _save_atomic(path, vectors)
    return vectors


def _recorded_digest(path: Path) -> str | None:
    """The sha256 recorded for a cache file, or None when the record is absent or unreadable."""
    try:
        fields = checksum_path(path).read_text().split()
    except (OSError, UnicodeDecodeError):
        return None
    digest = fields[0].lower() if fields else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else None


def _load_cached(path: Path, n_items: int) -> tuple[np.ndarray | None, str | None]:
    """A cached (N, D) matrix and None, or None and why the entry is unusable (None too when absent).

    An unusable entry is re-encoded and rewritten by `cached_vectors`.
    """
    if not path.is_file():
        return None, None
    recorded = _recorded_digest(path)
    if recorded is None:
        return None, f"no sha256 record ({checksum_path(path).name} missing or unreadable)"
    try:
        with open(path, "rb") as handle:  # one open file: the bytes hashed are the bytes loaded
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            if digest != recorded:
                return None, "its sha256 differs from the recorded one (the file changed after writing)"
            handle.seek(0)
            array = np.load(handle, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        return None, f"not a readable .npy ({error})"
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[0] != n_items:
        return None, f"shape {getattr(array, 'shape', None)} is not ({n_items}, D)"
    return array, None
