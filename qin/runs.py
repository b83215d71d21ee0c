"""Run folders, checkpoints and traceability (config, git commit, results lines).

A run folder holds:
    config.yaml      the exact config it was trained with
    metrics.jsonl    one JSON line per evaluation
    last.pt          full training state after the latest epoch/evaluation (for --resume)
    best.pt          model weights of the best evaluation, with config and vocab (for predict)
    checkpoints.json the sha256 of best.pt and last.pt, checked on every load
    result.json      the run's final summary; also appended to <run_root>/results.jsonl
Every file is written to a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a reader would take it for a whole one. Files get the user's umask
(0644 by default), like any file a command writes. Checkpoints are loaded with
``torch.load(weights_only=True)``: they hold tensors and plain values only, so loading someone
else's checkpoint cannot run code.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import io
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qin.errors import QinError

CHECKPOINT_FORMAT = "qin-checkpoint-v1"
DIGESTS = "checkpoints.json"
DIGESTS_FORMAT = "qin-checkpoint-digests-v1"
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


def check_replaceable(path: Path, is_ours: Callable[[Path], bool], kind: str) -> None:
    """Refuse an output path that exists and is not a regular file qin wrote (`is_ours` tells)."""
    path = Path(path)
    if path.is_symlink():
        raise QinError(f"{path}: is a symbolic link; qin replaces outputs atomically and would replace the "
                       "link itself, not write through it. Pass the target path")
    if not path.exists():
        return
    if not path.is_file():
        raise QinError(f"{path}: exists and is not a regular file (a folder or a device); "
                       "choose a file path")
    if not is_ours(path):
        raise QinError(f"{path}: exists and is not {kind}; not replacing it. Move it or choose another --out")


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plainly created file gets: 0666 minus the umask (0644 with the usual 022).

    `tempfile.mkstemp` creates 0600 files; renaming one into place would keep that and hide a
    submission or checkpoint from everyone else.
    """
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a plainly created folder gets (0755 with umask 022); `mkdtemp` makes 0700 ones."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`.

    A reader sees the old file or the new one, never a part; on any failure (a full disk, an
    interrupt) the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    make_parent_folders(path)
    remove_stale_temp_files(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error  # name the target, not a temp name
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.fchmod(handle.fileno(), file_mode())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(path: Path) -> None:
    """Remove `.<name>.<pid>.<random>.tmp` files beside `path` left by writers that were killed.

    Only names of exactly that shape are touched, and only when their pid is no longer running: a
    live writer's file, or anything a user named otherwise, is left alone.
    """
    path = Path(path)
    prefix = f".{path.name}."
    try:
        candidates = list(path.parent.glob(f"{glob_escape(prefix)}*.tmp"))
    except OSError:
        return
    for candidate in candidates:
        pid, _, rest = candidate.name[len(prefix):].partition(".")
        if pid.isdigit() and rest and not process_alive(int(pid)) and candidate.is_file():
            candidate.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 sends nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def make_parent_folders(path: Path) -> None:
    """Create the folders above `path`; a file standing where one of them should be is named as such."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # mkdir(exist_ok=True) raises this only when a component is a file
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", error.filename) from error


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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


def check_appendable(path: Path) -> None:
    """Refuse a log path that exists and is not a regular file (a folder, or a symlink into a user's file)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise QinError(f"{path}: exists and is not a regular file (qin appends one line per run to it); "
                       "move it away")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one line; a single small write, so concurrent runs do not interleave lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines file. A torn last line (a process killed mid-append) is
    skipped; a bad line before the end is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise QinError(f"{path}: line {number} is not valid JSON ({error})") from error
        if not isinstance(record, dict):
            raise QinError(f"{path}: line {number} is {type(record).__name__} {line.strip()[:40]!r}, "
                           "not a JSON object")
        records.append(record)
    return records
