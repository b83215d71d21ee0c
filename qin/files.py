"""Safe file writing, and the checks that keep qin from replacing or appending to what it did not write.

Every file qin writes goes to a temporary name beside its target (`.<name>.<pid>.<random>.tmp`), is
fsynced, and is renamed into place, so a crash never leaves a half-written file where a reader would
take it for a whole one; temporary files of killed writers are cleaned up by the next write. Files and
folders get the user's umask (0644 / 0755 by default), like any a command creates. An output path that
holds something qin did not write (a folder, a device, a symbolic link, someone's own file) is refused
rather than replaced. Also here: JSON-lines logs (metrics.jsonl, results.jsonl), appended one line at
a time and read back tolerating a torn last line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qin.errors import QinError


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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def remove_stale_temp_files(path: Path) -> None:
    """Remove `.<name>.<pid>.<random>.tmp` files beside `path` left by writers that were killed.

    Only regular files whose whole name has exactly that shape (the random part as mkstemp makes it) are
    touched, and only when their pid is no longer running: a live writer's file, a symlink, or anything a
    user named otherwise is left alone.
    """
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.") + r"([0-9]+)\.[a-z0-9_]+\.tmp")
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if candidate.is_file() and not candidate.is_symlink():
                candidate.unlink()
        except OSError:
            pass  # vanished or not removable meanwhile: nothing of ours to worry about


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally."""
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 sends nothing; it only checks).

    The one test every clean-up of a killed writer's leftovers uses: a file or folder named after a live
    pid belongs to a writer still at work and is never touched.
    """
    if pid <= 0:
        return True  # 0 and negatives address process groups: never take them for a dead writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):  # not a pid this system can have: no such process
        return False
    return True


def make_parent_folders(path: Path) -> None:
    """Create the folders above `path`; a file standing where one of them should be is named as such."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as error:  # mkdir(exist_ok=True) raises this only when a component is a file
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", error.filename) from error


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


def first_line(path: Path) -> str:
    """The first line of a file (at most 256 bytes), for recognising a header qin writes."""
    with path.open("rb") as handle:
        return handle.readline(256).decode("utf-8", errors="replace")


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
            if number == len(lines) and line.lstrip().startswith("{"):
                break  # a record cut short by a killed writer; anything else is damage, said below
            raise QinError(f"{path}: line {number} is not valid JSON ({error})") from error
        if not isinstance(record, dict):
            raise QinError(f"{path}: line {number} is {type(record).__name__} {line.strip()[:40]!r}, "
                           "not a JSON object")
        records.append(record)
    return records
