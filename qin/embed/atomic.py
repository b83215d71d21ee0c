"""Atomic file writes whose temporary names carry the writer's pid, so a killed writer's leftovers are found.

A file is written as ``.<name>.<pid>.<random>.tmp`` next to its target and renamed over it. Before each
write, temporaries of the same target whose pid is no longer a live process are removed: a ``qin embed``
killed mid-write leaves its (0600) temporary only until the next write of that file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qin.files import file_mode, remove_stale_temp_files


@contextmanager
def atomic_write(target: Path) -> Iterator[Path]:
    """A temporary path next to ``target`` to write; on a clean exit it gets the usual file mode and
    replaces ``target``. On an error it is removed. Stale temporaries of ``target`` are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target)
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
