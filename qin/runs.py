"""Run folders, checkpoints and traceability (config, git commit, results lines).

A run folder holds:
    config.yaml      the exact config it was trained with
    metrics.jsonl    one JSON line per evaluation
    last.pt          full training state after the latest epoch/evaluation (for --resume)
    best.pt          model weights of the best evaluation, with config and vocab (for predict)
    result.json      the run's final summary; also appended to <run_root>/results.jsonl
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a reader would take it for a whole one.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from qin.errors import QinError

CHECKPOINT_FORMAT = "qin-checkpoint-v1"


def git_commit() -> str | None:
    """The current commit of the source tree (with '+dirty' when it has changes), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}+dirty" if dirty else sha


def new_run_dir(run_root: Path, model_name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = run_root / f"{model_name}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = run_root / f"{model_name}-{stamp}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir


def latest_run_dir(run_root: Path) -> Path:
    """The most recently finished run (newest best.pt) under `run_root`."""
    candidates = sorted(run_root.glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise QinError(f"no trained run found under {run_root}/ (no */best.pt): run `qin train` first "
                       "or pass --run RUN_DIR")
    return candidates[-1].parent


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temporary file in the same folder, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a qin checkpoint on CPU; a clear error for a missing, foreign or corrupt file."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise QinError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a truncated/corrupt file
        raise QinError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise QinError(f"{path}: not a qin checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a single small write, so concurrent runs do not interleave lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
