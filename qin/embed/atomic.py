"""Atomic file writes whose temporary names carry the writer's pid, so a killed writer's leftovers are found.

A file is written as ``.<name>.<pid>.<random>.tmp`` next to its target and renamed over it. Before each
write, temporaries of the same target whose pid is no longer a live process are removed: a ``qin embed``
killed mid-write leaves its (0600) temporary only until the next write of that file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qin.files import file_mode, process_alive


def temp_name_pattern(target: Path) -> re.Pattern[str]:
    """Names of `atomic_write`'s temporaries for ``target``: ``.<name>.<pid>.<random>.tmp`` (group 1: pid)."""
    return re.compile(re.escape(f".{target.name}.") + r"([0-9]+)\.[a-z0-9_]+\.tmp")


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` (full-name matches only) left by processes that no longer run.

    Returns:
        The removed paths. Files that vanish or cannot be removed meanwhile are skipped silently.
    """
    pattern = temp_name_pattern(target)
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or process_alive(int(match.group(1))):
            continue
        try:
            if entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
        except OSError:
            pass
    return removed


@contextmanager
def atomic_write(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target`` to write; on a clean exit it gets the usual file mode and
    replaces ``target``. On an error it is removed. Stale temporaries of ``target`` are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
