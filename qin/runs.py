"""Run folders: creating, finding, reusing and locking the folder one `qin train` writes.

A run folder holds:
    config.yaml      the exact config it was trained with
    metrics.jsonl    one JSON line per evaluation
    last.pt          full training state after the latest epoch/evaluation (for --resume)
    best.pt          model weights of the best evaluation, with config and vocab (for predict)
    checkpoints.json the sha256 of best.pt and last.pt, checked on every load
    result.json      the run's final summary; also appended to <run_root>/results.jsonl
Every file is written atomically (qin.files); checkpoints are saved and verified by qin.checkpoints.
Here: naming a new run folder, picking the latest finished one, refusing or clearing a folder before a
fresh run, the lock that keeps two trainings out of one folder, and the git commit a run records.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path
from typing import Any

from qin.checkpoints import DIGESTS
from qin.errors import QinError
from qin.files import glob_escape, make_parent_folders

# What a run folder written by `qin train` holds (see the module docstring); `--overwrite` removes these only.
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", DIGESTS, "result.json")
LOCK = ".qin-train.lock"  # held (flock) by the one `qin train` using the folder; kept between runs


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
    """The most recently finished run under `run_root`: newest result.json beside a best.pt.

    A run still training or killed has a best.pt but no result.json; it is never picked by default.
    """
    finished = [path for path in run_root.glob("*/result.json") if (path.parent / "best.pt").is_file()]
    candidates = sorted(finished, key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise QinError(f"no finished run found under {run_root}/ (no */result.json with a best.pt): run "
                       "`qin train` first or pass --run RUN_DIR")
    return candidates[-1].parent


def is_run_dir(folder: Path) -> bool:
    """Whether `folder` looks like one `qin train` wrote: config.yaml plus a checkpoint or metrics."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl", DIGESTS, LOCK))


def remove_run_temp_files(run_dir: Path) -> None:
    """Temporary files of the run's own writes (`.best.pt.*.tmp`, ...) left by a killed run.

    Called with the run folder locked, so no other `qin train` is writing there: every such file is stale.
    """
    for name in RUN_FILES:
        for leftover in Path(run_dir).glob(f".{glob_escape(name)}.*.tmp"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder while one `qin train` writes it.

    Two trainings (or two `--resume`s) in one folder would interleave their checkpoints and metrics.
    `flock` on a file inside the folder is released by the kernel when the process dies, even by
    `kill -9`, so a killed run never leaves a stale lock. The lock file stays in the folder.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._handle: Any = None
        self._made_file = False  # whether this lock created the lock file (then a failed start removes it)

    def acquire(self) -> bool:
        """Take the lock, creating the folder if needed; True when this call created the folder."""
        import fcntl

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise QinError(f"{self.run_dir}: exists and is a file, not a run folder")
        created = not self.run_dir.exists()
        make_parent_folders(self.run_dir / LOCK)
        self._made_file = not (self.run_dir / LOCK).exists()
        handle = (self.run_dir / LOCK).open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise QinError(f"{self.run_dir}: another `qin train` (pid {holder}) is using this run folder; "
                           "wait for it to finish or choose another --run-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return created

    def release(self, failed: bool = False) -> None:
        """Drop the lock. After a failed start, a lock file this lock made in a folder that holds no
        run (e.g. a folder that was refused) is removed: qin leaves nothing in folders it did not use."""
        if self._handle is not None:
            self._handle.close()  # closing the descriptor drops the flock
            self._handle = None
        if failed and self._made_file and not is_run_dir(self.run_dir):
            (self.run_dir / LOCK).unlink(missing_ok=True)


def prepare_run_dir(run_dir: Path, overwrite: bool) -> bool:
    """Make `run_dir` ready for a fresh run; True when this call created the folder.

    A folder that does not exist is created; an empty one is used. An earlier run's folder is
    replaced only with `overwrite` (then only the files a run writes are removed; anything else in
    it stays). A folder with other content is never used: qin would mix its files into it.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise QinError(f"{run_dir}: exists and is a file, not a run folder")
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        return True
    entries = sorted(path.name for path in run_dir.iterdir() if path.name != LOCK)
    if not entries:
        return False
    if not is_run_dir(run_dir):
        raise QinError(f"{run_dir}: exists and is not a qin run folder (holds {', '.join(entries[:5])}"
                       f"{', ...' if len(entries) > 5 else ''}); choose a new or empty folder")
    if not overwrite:
        state = "a finished run" if (run_dir / "result.json").is_file() else "an unfinished run"
        raise QinError(f"{run_dir}: already holds {state}; continue it with `qin train --resume {run_dir}`, "
                       "replace it with --overwrite, or choose another --run-dir")
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    remove_run_temp_files(run_dir)
    return False


def remove_unstarted_run(run_dir: Path) -> None:
    """Remove a run folder this command created when the run failed before its first checkpoint.

    Only the files a run writes are removed, and the folder only if that leaves it empty.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
        return
    for name in (*RUN_FILES, LOCK):
        (run_dir / name).unlink(missing_ok=True)
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
    if not any(run_dir.iterdir()):
        run_dir.rmdir()
