"""Replacing a feature folder safely: temp folders, their markers, stale-folder cleanup, publishing.

A build writes ``<out_dir>.tmp-<pid>`` and `publish` renames it into place, moving an older build
aside to ``<out_dir>.old-<pid>`` until the new one is in, so a failure at any point leaves one
complete folder. Both temp names carry `TEMP_MARKER`, the proof that they are the build's own:
`remove_stale` deletes those of builds killed outright, and nothing else. `check_replaceable`
refuses to replace a folder holding anything a build does not write (a run, a submission, notes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qin.errors import QinError, os_error
from qin.features.io import MANIFEST, SPLITS
from qin.features.raw import ID, ITEM_ID, LABEL, LIKES_LEVEL, USER_ID, VIEWS_LEVEL
from qin.files import process_alive

# What a build writes, and so all that a rebuild may delete: manifest.json, items/ with these files,
# and a folder per split with (some of) these arrays.
_ITEM_FILES = frozenset({"item_tags.npy", "item_emb.npy"})
_SPLIT_FILES = frozenset(
    f"{name}.npy" for name in (ITEM_ID, "history", LIKES_LEVEL, VIEWS_LEVEL, USER_ID, LABEL, ID)
)
_BUILT_FOLDERS: dict[str, frozenset[str]] = {"items": _ITEM_FILES} | {split: _SPLIT_FILES for split in SPLITS}
_FOREIGN_SHOWN = 5  # foreign paths named in the refusal

# The proof that a ``<out_dir>.tmp-<pid>`` / ``.old-<pid>`` folder is the build's own: written into the
# temp folder right after it is made, and into an old build right after it is renamed aside (holding
# the pid). Stale-folder cleanup deletes only folders that hold it (see `_made_by_qin`), never a
# user's folder that merely has a matching name. It travels with the temp folder into ``out_dir``,
# where it is removed after the rename (and tolerated if a crash left it there).
TEMP_MARKER = ".qin-preprocess-temp"


def remove_stale(out_dir: Path) -> None:
    """Delete ``<out_dir>.tmp-<pid>`` / ``.old-<pid>`` folders of builds that were killed outright.

    A build removes its own temp folder on any Python exception, but not on SIGKILL or a power
    cut. A folder whose pid is ours (an earlier call) or no longer running is garbage if the build
    made it (`_made_by_qin`); one of a live process is a concurrent build and is left alone, and so
    is any folder that only has a matching name (a user's ``<out_dir>.old-2`` with a thesis in it).
    An empty one (a build killed between making the folder and marking it) is removed: that loses
    nothing. Best effort, never an error: it also runs before a no-op on an up-to-date folder, whose
    parent may be read-only or unlistable.
    """
    try:
        if not out_dir.parent.is_dir():
            return
        candidates = list(out_dir.parent.glob(f"{out_dir.name}.*-*"))
    except OSError:
        return
    for path in candidates:
        kind, _, pid = path.name.removeprefix(f"{out_dir.name}.").partition("-")
        if kind not in ("tmp", "old") or not (pid.isascii() and pid.isdigit()):  # int("²") fails
            continue
        try:
            if int(pid) != os.getpid() and process_alive(int(pid)):
                continue
            if path.is_symlink() or not path.is_dir():
                continue
            if _made_by_qin(path, kind):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rmdir()  # only when empty (ENOTEMPTY otherwise, which leaves it as it is)
        except OSError:
            continue


def _made_by_qin(folder: Path, kind: str) -> bool:
    """Whether a stale ``.tmp-<pid>`` / ``.old-<pid>`` folder is the build's own, so safe to delete.

    It is when it holds `TEMP_MARKER` (a regular file). An ``.old-`` folder without one is an older
    build renamed aside by a build killed before it wrote the marker: it is deleted only when it is
    a complete feature folder holding nothing a build does not write (the rule `check_replaceable`
    applies before replacing a folder), never otherwise.
    """
    marker = folder / TEMP_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    if kind != "old":
        return False
    manifest = folder / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        return False
    try:
        content = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and "format_version" in content and not _foreign_entries(folder)


def mark(folder: Path) -> None:
    """Write `TEMP_MARKER` (this process's pid) into a folder the build made or renamed aside."""
    (folder / TEMP_MARKER).write_text(f"{os.getpid()}\n")


def _unmark(folder: Path) -> None:
    """Remove `TEMP_MARKER` from a published folder (best effort: a leftover one is tolerated)."""
    try:
        (folder / TEMP_MARKER).unlink(missing_ok=True)
    except OSError:
        pass


def check_names_free(out_dir: Path, tmp: Path) -> None:
    """Refuse to build when the temp or old name this build needs is taken by a folder it did not make.

    `remove_stale` already removed those the build made; anything left there (a user's folder that
    happens to have the name) is never deleted or overwritten.
    """
    names = [tmp]
    if out_dir.exists():
        names.append(_old_name(out_dir))
    for path in names:
        if os.path.lexists(path):
            raise _name_taken(path)


def _name_taken(path: Path) -> QinError:
    """The refusal for a temp / old name held by something the build did not make."""
    return QinError(
        f"{path}: exists and was not made by `qin preprocess` (no {TEMP_MARKER} in it); the build "
        "needs this name for a temporary folder, so move or rename it first"
    )


def temp_name(out_dir: Path) -> Path:
    """Where a build writes before `publish`: ``<out_dir>.tmp-<pid>``."""
    return out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")


def _old_name(out_dir: Path) -> Path:
    """Where `publish` renames an older build aside: ``<out_dir>.old-<pid>``."""
    return out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a feature folder, or holds anything a build did not write.

    A rebuild replaces the folder whole, so a mistyped ``--out data/``, a run folder made with
    ``qin train --run-dir <feature folder>/myrun``, a submission or notes saved there would be
    deleted without a word. The refusal names up to 5 such paths (relative to the folder).
    """
    try:
        if not out_dir.exists():
            return
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file()):
            raise QinError(f"{out_dir}: exists and is not a feature folder (no {MANIFEST}); not replacing it")
        foreign = _foreign_entries(out_dir)
    except OSError as error:  # an unlistable folder: never replace what could not be checked
        raise os_error(error, doing="checking the feature folder before replacing it") from error
    if foreign:
        shown = ", ".join(foreign[:_FOREIGN_SHOWN])
        if len(foreign) > _FOREIGN_SHOWN:
            shown += f" and {len(foreign) - _FOREIGN_SHOWN} more"
        raise QinError(
            f"{out_dir}: holds files `qin preprocess` did not write ({shown}); rebuilding replaces the "
            "whole folder and would delete them, so move them out of it first"
        )


def _foreign_entries(out_dir: Path) -> list[str]:
    """Paths under ``out_dir`` (relative, folders with a trailing ``/``) that a build does not write.

    A foreign folder is named once, not descended into. A known name of the wrong kind (a ``train``
    file, a symlink where an array should be) is foreign too: the build never writes one. A
    `TEMP_MARKER` file is the build's own (left by a build killed right after publishing).
    """
    foreign = []
    for entry in _entries(out_dir):
        if entry.name in (MANIFEST, TEMP_MARKER) and entry.is_file(follow_symlinks=False):
            continue
        files = _BUILT_FOLDERS.get(entry.name)
        if files is None or not entry.is_dir(follow_symlinks=False):
            foreign.append(_shown(entry, out_dir))
            continue
        foreign += [
            _shown(inner, out_dir)
            for inner in _entries(Path(entry.path))
            if inner.name not in files or not inner.is_file(follow_symlinks=False)
        ]
    return foreign


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """A folder's entries, by name (OSError when it cannot be listed)."""
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _shown(entry: os.DirEntry[str], root: Path) -> str:
    """An entry's path relative to ``root`` for a one-line message (a folder ends in ``/``)."""
    text = Path(entry.path).relative_to(root).as_posix()
    text += "/" if entry.is_dir(follow_symlinks=False) else ""
    return text if text.isprintable() else repr(text)


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to ``out_dir``, replacing an older build.

    The old folder is renamed aside first and deleted only after the new one is in place, so a
    failure at any point leaves either the old or the new complete folder. The old folder gets
    `TEMP_MARKER` right after the rename; killed before that, it is still recognised as the
    build's own by its manifest (`_made_by_qin`).
    """
    old = None
    if out_dir.exists():
        old = _old_name(out_dir)
        if os.path.lexists(old):  # taken since `check_names_free`: never delete or replace it
            raise _name_taken(old)
        os.replace(out_dir, old)
        try:
            mark(old)
        except OSError:  # a full disk: the manifest still identifies it
            pass
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
            _unmark(out_dir)
        raise
    _unmark(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
