"""One exception type for every error a user can fix (bad file, column, config key, path).

The CLI prints these as a one-line red message and exits with code 2; anything else is a bug
and keeps its traceback. Operating-system failures a user fixes outside qin (a full disk, a
read-only folder, a file where a folder should be) become `QinError`s through `os_error`.
"""

from __future__ import annotations

import errno


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


def os_error(error: OSError, doing: str | None = None) -> QinError:
    """A one-line `QinError` for an OSError: the path, the cause and, if given, what was being done.

    e.g. ``/data/features/x.tmp-12: no space left on the device (writing the feature folder)``.
    """
    path = error.filename if error.filename is not None else "?"
    if error.filename2 is not None:
        path = f"{path} -> {error.filename2}"
    cause = _CAUSES.get(error.errno or -1) or error.strerror or str(error)
    suffix = f" ({doing})" if doing else ""
    return QinError(f"{path}: {cause}{suffix}")
