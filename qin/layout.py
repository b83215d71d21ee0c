"""The challenge's file layout, shared by both data generators: folder names, the impression-row schema,
and the safe writing of a generator's output folder.

    <data set>/MicroLens_1M_x1/{train,valid,test}.parquet   rows of ROW_FIELDS (test: ID first; train and
                                                             valid: label last), item_info.parquet
    <data set>/hidden/                                       a generator's truth, never read by a model
    <data set>/hidden/meta.json                              the marker: which generator wrote the data set
                                                             and which entries of <data set> ("outputs")
    <data set>/hidden/files.txt                              every file it wrote under those entries, one
                                                             relative path a line, sorted (the "file_list")

Both generators (`qin synth`, `qin synth --process logs`) write into a temporary folder next to the output
and rename the finished entries in. They never delete or replace anything they did not write: an existing
output folder is accepted only when it is empty, or when hidden/meta.json proves that an earlier run wrote
every generator output name it holds and hidden/files.txt lists every file under them (`check_out_dir`).
Other entries (a notes.txt) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa

from qin.errors import QinError
from qin.files import process_alive

DATA_SUBDIR = "MicroLens_1M_x1"
HIDDEN_SUBDIR = "hidden"
META_FILE = "meta.json"  # in HIDDEN_SUBDIR
FILE_LIST = "files.txt"  # in HIDDEN_SUBDIR: every file a generator wrote (see write_file_list)
FILE_LIST_PATH = f"{HIDDEN_SUBDIR}/{FILE_LIST}"  # meta.json's "file_list": declares that the list exists
TEMP_MARKER = ".qin-synth-temp"  # in a generator's temp folder: its pid, the proof that qin made the folder

# The columns every split has, in the organisers' order (docs/data.md section 1.1).
ROW_FIELDS = [
    pa.field("user_id", pa.int64()),
    pa.field("item_seq", pa.list_(pa.int64())),
    pa.field("item_id", pa.int64()),
    pa.field("likes_level", pa.int64()),
    pa.field("views_level", pa.int64()),
]

# Every entry either generator may write into its output folder: the names that are only ever replaced when
# a marker proves an earlier run wrote them (they are also the organisers' names for their real files).
GENERATOR_OUTPUTS = (DATA_SUBDIR, "item_feature.parquet", "item_emb.parquet", "item_seq.parquet",
                     "item_images", HIDDEN_SUBDIR)
# meta.json "generator" values of qin's generators (qin.synth's and qin.loggen's).
GENERATOR_NAMES = ("qin.synth", "loggen")
_SHOWN = 6  # foreign entries named in the refusal
_SHOWN_FILES = 5  # foreign files named in the refusal


def _read_marker(out_dir: Path) -> dict | None:
    """hidden/meta.json of out_dir when it is a qin generator's marker; None otherwise (absent, not JSON)."""
    try:
        meta = json.loads((out_dir / HIDDEN_SUBDIR / META_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):  # ValueError: not JSON
        return None
    if not isinstance(meta, dict) or meta.get("generator") not in GENERATOR_NAMES:
        return None
    return meta


def written_outputs(out_dir: Path) -> frozenset[str] | None:
    """The entries of out_dir that hidden/meta.json says an earlier qin generator wrote; None if unproven.

    The marker lists them under "outputs". Markers written before that list existed are read from what their
    generator always wrote (qin.synth: item_images/ only when "images_written" is true); anything else is
    unproven, so that a caller refuses rather than guesses.
    """
    meta = _read_marker(out_dir)
    if meta is None:
        return None
    outputs = meta.get("outputs")
    if isinstance(outputs, list) and all(isinstance(name, str) for name in outputs):
        return frozenset(outputs)
    if outputs is not None:
        return None
    if meta["generator"] == "loggen":
        return frozenset((DATA_SUBDIR, HIDDEN_SUBDIR))
    images = meta.get("images_written")
    if not isinstance(images, bool):
        return None
    return frozenset(name for name in GENERATOR_OUTPUTS if images or name != "item_images")


def list_files(folder: Path, names: Iterable[str]) -> list[str]:
    """Everything under the entries ``names`` of folder, as sorted relative paths ("a/b.parquet").

    Files, symlinks (never followed: a link to a folder is one entry) and other non-folders are listed;
    a folder only when it is empty, as "a/sub/". One os.scandir walk: cheap even for item_images/ at full
    size (~92k files). Names that do not exist are skipped.
    """
    found: list[str] = []
    folders: list[str] = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            folders.append(name)
        elif os.path.lexists(path):
            found.append(name)
    while folders:
        rel = folders.pop()
        with os.scandir(folder / rel) as scan:
            children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan]
        if not children:
            found.append(f"{rel}/")
        for name, is_dir in children:
            (folders if is_dir else found).append(f"{rel}/{name}")
    return sorted(found)


def write_file_list(tmp: Path) -> None:
    """Record in tmp/hidden/files.txt every file the generator wrote into tmp (itself included).

    Called when every output is written, before the install, so that hidden/ arrives with its list. The
    generators declare the list in meta.json ("file_list": FILE_LIST_PATH), which makes it required.
    """
    files = list_files(tmp, present_outputs(tmp))
    (tmp / FILE_LIST_PATH).write_text("".join(f"{rel}\n" for rel in sorted({*files, FILE_LIST_PATH})))


def written_files(out_dir: Path, tool: str) -> frozenset[str] | None:
    """The files (relative paths) hidden/files.txt says an earlier run wrote; None for older markers.

    A marker that declares the list ("file_list") but whose list is missing or unreadable proves nothing
    about the files beside it, so that is refused (QinError) rather than guessed.
    """
    meta = _read_marker(out_dir)
    if meta is None or meta.get("file_list") is None:
        return None  # written before the list existed: the caller checks entries only, as before
    path = out_dir / FILE_LIST_PATH
    try:
        return frozenset(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    except (OSError, UnicodeDecodeError) as error:
        why = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise QinError(f"{tool}: {out_dir} was written by `qin synth`, but its list of written files {path} "
                       f"cannot be read ({why.lower()}); refusing to replace anything: move your files out "
                       "and delete the folder, or choose another") from None


def _foreign_files(out_dir: Path, names: Iterable[str], recorded: frozenset[str]) -> list[str]:
    """The paths under out_dir's entries ``names`` that are not in the recorded list (see list_files).

    A file counts as recorded by its path; an empty folder when the list names it ("a/sub/") or a file
    under it (the user deleted the files, which is fine).
    """
    unknown = [rel for rel in list_files(out_dir, names) if rel not in recorded]
    if not any(rel.endswith("/") for rel in unknown):
        return unknown
    folders = {rel.rsplit("/", i)[0] for rel in recorded for i in range(1, rel.count("/") + 1)}
    return [rel for rel in unknown if not (rel.endswith("/") and rel[:-1] in folders)]


def _shown(paths: list[str], limit: int) -> str:
    """Up to ``limit`` paths, comma-separated, printable on one line, with "and N more"."""
    shown = [path.encode("utf-8", "backslashreplace").decode().replace("\n", "\\n").replace("\r", "\\r")
             for path in paths[:limit]]
    return ", ".join(shown) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_out_dir(out_dir: Path, tool: str) -> None:
    """Refuse, before any work, an output path that is a file, lies under a file, or holds foreign outputs.

    An existing folder is accepted when it is empty, or when its hidden/meta.json comes from a qin generator
    and lists every entry of GENERATOR_OUTPUTS the folder holds (those are replaced; other entries stay),
    and its hidden/files.txt lists every file under those entries (a user's file added inside one, such as
    MicroLens_1M_x1/extra.parquet, would go with it). Markers written before the file list existed are
    checked by entry only. Anything else (no marker, a marker of another tool, an item_images/ that the last
    run did not write) may be the organisers' real files, so nothing is touched. ``tool`` prefixes the
    message.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise QinError(f"{tool}: output folder {out_dir} exists and is a file; pass a folder path")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QinError(f"{tool}: cannot create {out_dir}: {parent} is a file")
            break
    if not out_dir.is_dir():
        return
    if not os.access(out_dir, os.W_OK):
        raise QinError(f"{tool}: {out_dir} is not writable (a read-only folder or file system)")
    if out_dir.stat().st_dev != out_dir.resolve().parent.stat().st_dev:
        # The data set is built in a temporary folder beside the output and renamed in; a rename cannot
        # cross file systems, so a mount point itself (an empty volume, a second disk) cannot be the output.
        raise QinError(f"{tool}: {out_dir} is a mount point (another file system than its parent folder); "
                       f"write into a folder inside it instead, e.g. --out {out_dir / 'data'}")
    entries = sorted(path.name for path in out_dir.iterdir())
    if not entries:
        return
    written = written_outputs(out_dir)
    if written is None:
        foreign = entries
        why = f"no {HIDDEN_SUBDIR}/{META_FILE} of `qin synth`"
    else:
        foreign = [name for name in entries if name in GENERATOR_OUTPUTS and name not in written]
        why = f"the earlier run's {HIDDEN_SUBDIR}/{META_FILE} does not list them"
    if foreign:
        raise QinError(f"{tool}: {out_dir} holds {_shown(foreign, _SHOWN)}, not written by `qin synth` "
                       f"({why}); refusing to replace anything: choose an empty folder or one that an "
                       "earlier `qin synth` wrote")
    recorded = written_files(out_dir, tool)
    if recorded is None:
        return
    extra = _foreign_files(out_dir, [name for name in entries if name in GENERATOR_OUTPUTS], recorded)
    if extra:
        raise QinError(f"{tool}: {out_dir} holds files `qin synth` did not write: "
                       f"{_shown(extra, _SHOWN_FILES)}; refusing to replace the outputs that hold them: "
                       "move them out first")


def make_temp_dir(out_dir: Path) -> Path:
    """A new folder ``.<out name>.tmp-<pid>-<random>`` next to out_dir (same file system: renames work).

    It holds TEMP_MARKER (the pid) from the start: the proof that qin made it, which remove_stale_temp_dirs
    requires before it deletes anything. Stale ones of killed runs are removed first; the pid in the name
    tells them from a running one's.
    """
    remove_stale_temp_dirs(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        (tmp / TEMP_MARKER).write_text(f"{os.getpid()}\n")
    except BaseException:  # the caller never sees tmp: remove it here (a full disk, an interrupt)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _is_qin_temp_dir(path: Path, pid: str) -> bool:
    """Whether path is a folder (not a link) holding TEMP_MARKER with ``pid``: make_temp_dir made it."""
    if not path.is_dir() or path.is_symlink():
        return False
    marker = path / TEMP_MARKER
    try:
        return not marker.is_symlink() and marker.is_file() and marker.read_text().strip() == pid
    except (OSError, UnicodeDecodeError):
        return False


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete the temp folders of out_dir (see make_temp_dir) whose process no longer runs.

    A run removes its own temp folder on any exception, but not when it is killed outright (SIGKILL, a
    power cut). A folder whose process is alive is a concurrent run's and is left alone, ours included. So is
    any folder without make_temp_dir's TEMP_MARKER (naming its pid): a name alone proves nothing, and a
    look-alike may be the user's.
    """
    if not out_dir.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-(\d+)-[a-z0-9_]+")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and _is_qin_temp_dir(path, match[1]) and not process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)





def install_outputs(tmp: Path, out_dir: Path, tool: str) -> None:
    """Move the finished outputs from tmp into out_dir (each move a rename), replacing the earlier run's.

    tmp/hidden/files.txt is written first (write_file_list). The folder is checked again, files included:
    the run may have taken minutes. Old outputs (any GENERATOR_OUTPUTS the check proved qin's, also the
    other generator's) go aside into tmp before the new ones come in, so old and new never mix. hidden/ (the
    marker and file list) leaves last and arrives first, so that if this stops half-way, every output name
    and file left in out_dir is still listed by the hidden/ there.
    """
    if (tmp / HIDDEN_SUBDIR).is_dir():
        write_file_list(tmp)
    check_out_dir(out_dir, tool)
    out_dir.mkdir(parents=True, exist_ok=True)
    trash = tmp / ".old"
    trash.mkdir()
    marker_last = [name for name in GENERATOR_OUTPUTS if name != HIDDEN_SUBDIR] + [HIDDEN_SUBDIR]
    for name in marker_last:
        if (out_dir / name).exists() or (out_dir / name).is_symlink():
            os.replace(out_dir / name, trash / name)
    for name in reversed(marker_last):
        if (tmp / name).exists():
            os.replace(tmp / name, out_dir / name)


def present_outputs(folder: Path) -> list[str]:
    """The GENERATOR_OUTPUTS a generator wrote into its temp folder: meta.json's "outputs" list."""
    return [name for name in GENERATOR_OUTPUTS if (folder / name).exists()]
