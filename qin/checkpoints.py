"""Checkpoints: saving and loading best.pt / last.pt, each verified against its recorded sha256.

A run folder's checkpoints.json lists the sha256 of its best.pt and last.pt; every load checks the file
against it, so a corrupted or replaced checkpoint is refused instead of silently changing predictions.
Checkpoints are written atomically (qin.files) and loaded with ``torch.load(weights_only=True)``: they
hold tensors and plain values only, so loading someone else's checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from qin.errors import QinError
from qin.files import atomic_write_bytes, atomic_write_text

CHECKPOINT_FORMAT = "qin-checkpoint-v1"
DIGESTS = "checkpoints.json"
DIGESTS_FORMAT = "qin-checkpoint-digests-v1"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise `state`, record its sha256 in the folder's checkpoints.json, write it atomically.

    The digest list names the new digest beside the old one while the file is replaced, so a crash
    at any point leaves a checkpoint whose digest is recorded. Serialising to memory first means a
    full disk is an OSError from the write, not a torch error about zip positions.
    """
    path = Path(path)
    buffer = io.BytesIO()
    # "digests" tells a reader that this file's sha256 is recorded beside it: without that record (a
    # deleted or emptied checkpoints.json) the file cannot be verified and is refused.
    torch.save({"format": CHECKPOINT_FORMAT, "digests": DIGESTS, **state}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    recorded = _read_digests(path.parent)
    previous = [old for old in recorded.get(path.name, []) if old != digest][-1:]
    _write_digests(path.parent, {**recorded, path.name: previous + [digest]})
    atomic_write_bytes(path, data)
    _write_digests(path.parent, {**recorded, path.name: [digest]})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a qin checkpoint on CPU; a clear error for a missing, foreign, corrupt or altered file.

    When the folder has a checkpoints.json (every run since it was introduced), the file's sha256
    must be one recorded there: flipped bytes inside a tensor would otherwise load silently and
    change every prediction.
    """
    path = Path(path)
    if path.is_dir() and path.suffix == ".pt":
        raise QinError(f"{path}: is a folder, not a checkpoint file")
    if path.is_dir():
        path = path / "best.pt"
    if path.exists() and not path.is_file():
        raise QinError(f"{path}: is a folder or a device, not a checkpoint file")
    if not path.is_file():
        raise QinError(f"checkpoint not found: {path}")
    recorded = _read_digests(path.parent)
    if recorded and path.name not in recorded:
        raise QinError(f"{path}: not one of this run's checkpoints ({', '.join(sorted(recorded))}); pass the "
                       f"run folder ({path.parent}) or one of those files")
    data = path.read_bytes()
    if recorded and hashlib.sha256(data).hexdigest() not in recorded.get(path.name, []):
        raise QinError(f"{path}: content does not match the sha256 recorded in {path.parent / DIGESTS} "
                       "(the file was corrupted or replaced); refusing to load it")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated/corrupt/foreign file
        raise QinError(f"{path}: not a readable checkpoint ({_load_failure(error)})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise QinError(f"{path}: not a qin checkpoint (expected format {CHECKPOINT_FORMAT})")
    if state.get("digests") == DIGESTS and path.name not in recorded:
        raise QinError(f"{path}: its sha256 should be recorded in {path.parent / DIGESTS}, which is missing "
                       "or has no entry for it, so the file cannot be verified; refusing to load it")
    return state


def _load_failure(error: Exception) -> str:
    """Why torch.load failed, in one short line (its weights-only message is a page of advice)."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "it holds pickled Python objects besides tensors and plain values; qin never unpickles those"
    first_line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first_line[:200]}"


def _read_digests(folder: Path) -> dict[str, list[str]]:
    """checkpoints.json's {file name: accepted sha256 list}; empty when the folder has none."""
    path = folder / DIGESTS
    if path.exists() and not path.is_file():
        raise QinError(f"{path}: is not a regular file (it should hold the checkpoint digests)")
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise QinError(f"{path}: cannot read the checkpoint digests ({error})") from error
    if not isinstance(content, dict) or content.get("format") != DIGESTS_FORMAT:
        raise QinError(f"{path}: not a qin checkpoint digest file (expected format {DIGESTS_FORMAT})")
    return {name: list(digests) for name, digests in content.get("sha256", {}).items()}


def _write_digests(folder: Path, digests: dict[str, list[str]]) -> None:
    atomic_write_text(folder / DIGESTS, json.dumps({"format": DIGESTS_FORMAT, "sha256": digests}, indent=2))
