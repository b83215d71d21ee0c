"""One exception type for every error a user can fix (bad file, column, config key, path).

The CLI prints these as a one-line red message and exits with code 2; anything else is a bug
and keeps its traceback. Operating-system failures a user fixes outside qin (a full disk, a
read-only folder, a file where a folder should be) become `QinError`s through `os_error`.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class QinError(Exception):
    """An error in the user's input: names the file, column, key and (where it applies) the row."""


# Causes said in words a user acts on; the strerror text of the rest is clear enough.
_CAUSES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a path component is a file, not a folder",
    errno.EISDIR: "is a folder, expected a file",
    errno.EEXIST: "already exists",
}


def os_error(error: OSError, doing: str | None = None, path: Path | str | None = None) -> QinError:
    """A one-line `QinError` for an OSError: the path, the cause and, if given, what was being done.

    e.g. ``/data/features/x: no space left on the device (writing the feature folder)``. `path` is
    named when the error carries none. Some writers (numpy's, zip's) raise an OSError without an
    errno on a full disk; then the free space of the path's file system decides the cause.
    """
    named = error.filename if error.filename is not None else path
    shown = str(named) if named is not None else "(path unknown)"
    if error.filename2 is not None:
        shown = f"{shown} -> {error.filename2}"
    cause = _CAUSES.get(error.errno or -1)
    if cause is None and error.errno is None and named is not None and _disk_full(Path(named)):
        cause = _CAUSES[errno.ENOSPC]
    if cause is None:
        cause = error.strerror or str(error) or type(error).__name__
    suffix = f" ({doing})" if doing else ""
    return QinError(f"{shown}: {cause}{suffix}")


def _disk_full(path: Path) -> bool:
    """Whether the file system holding `path` (or its nearest existing parent) has under 1 MiB free."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free < 1 << 20
            except OSError:
                return False
    return False
