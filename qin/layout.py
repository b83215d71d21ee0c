"""The challenge's file layout, shared by both data generators: folder names, the impression-row schema,
and the safe writing of a generator's output folder.

    <data set>/MicroLens_1M_x1/{train,valid,test}.parquet   rows of ROW_FIELDS (test: ID first; train and
                                                             valid: label last), item_info.parquet
    <data set>/hidden/                                       a generator's truth, never read by a model
    <data set>/hidden/meta.json                              the marker: which generator wrote the data set
                                                             and which entries of <data set> ("outputs")

Both generators (`qin synth`, `qin synth --process logs`) write into a temporary folder next to the output
and rename the finished entries in. They never delete or replace anything they did not write: an existing
output folder is accepted only when it is empty, or when hidden/meta.json proves that an earlier run wrote
every generator output name it holds (`check_out_dir`). Other entries (a notes.txt) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa

from qin.errors import QinError

DATA_SUBDIR = "MicroLens_1M_x1"
HIDDEN_SUBDIR = "hidden"
META_FILE = "meta.json"  # in HIDDEN_SUBDIR

# The columns every split has, in the organisers' order (data.md section 1.1).
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


def written_outputs(out_dir: Path) -> frozenset[str] | None:
    """The entries of out_dir that hidden/meta.json says an earlier qin generator wrote; None if unproven.

    The marker lists them under "outputs". Markers written before that list existed are read from what their
    generator always wrote (qin.synth: item_images/ only when "images_written" is true); anything else is
    unproven, so that a caller refuses rather than guesses.
    """
    try:
        meta = json.loads((out_dir / HIDDEN_SUBDIR / META_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError):  # ValueError: not JSON
        return None
    if not isinstance(meta, dict) or meta.get("generator") not in GENERATOR_NAMES:
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


def check_out_dir(out_dir: Path, tool: str) -> None:
    """Refuse, before any work, an output path that is a file, lies under a file, or holds foreign outputs.

    An existing folder is accepted when it is empty, or when its hidden/meta.json comes from a qin generator
    and lists every entry of GENERATOR_OUTPUTS the folder holds (those are replaced; other entries stay).
    Anything else (no marker, a marker of another tool, an item_images/ that the last run did not write)
    may be the organisers' real files, so nothing is touched. ``tool`` prefixes the message.
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
        shown = ", ".join(foreign[:_SHOWN]) + (f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN
                                                else "")
        raise QinError(f"{tool}: {out_dir} holds {shown}, not written by `qin synth` ({why}); refusing to "
                       "replace anything: choose an empty folder or one that an earlier `qin synth` wrote")


def make_temp_dir(out_dir: Path) -> Path:
    """A new folder ``.<out name>.tmp-<pid>-<random>`` next to out_dir (same file system: renames work).

    Stale ones of killed runs are removed first; the pid in the name tells them from a running one's.
    """
    remove_stale_temp_dirs(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Delete the temp folders of out_dir (see make_temp_dir) whose process no longer runs.

    A run removes its own temp folder on any exception, but not when it is killed outright (SIGKILL, a
    power cut). A folder whose process is alive is a concurrent run's and is left alone, ours included.
    """
    if not out_dir.parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-(\d+)-[a-z0-9_]+")
    for path in out_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 sends nothing; it only checks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):  # not a pid this system can have
        return False
    return True


def install_outputs(tmp: Path, out_dir: Path, tool: str) -> None:
    """Move the finished outputs from tmp into out_dir (each move a rename), replacing the earlier run's.

    The folder is checked again first: the run may have taken minutes. Old outputs (any GENERATOR_OUTPUTS
    the check proved qin's, also the other generator's) go aside into tmp before the new ones come in, so
    old and new never mix. hidden/ (the marker) leaves last and arrives first, so that if this stops half-way,
    every output name left in out_dir is still listed by the meta.json there.
    """
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
