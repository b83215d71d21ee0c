"""`qin preprocess`: raw challenge parquet files -> a memory-mappable feature folder.

Composition only: `build_features` runs the build's steps in order and leaves each to its module:
raw files are read by `raw.py`, checked by `validate.py`, transformed by `steps.py`, written by
`write.py` in the format of `io.py`; the folder's name and up-to-date check are `folder.py`'s, and
replacing it safely is `publish.py`'s. The build is

1. check that every input exists and hash it (size + sha256); if the folder's manifest records the
   same inputs and config, stop (a no-op);
2. check every file's columns and dtypes (footer only) so a bad test.parquet fails in seconds, not
   after the train split was processed;
3. item_info -> items/item_tags.npy, items/item_emb.npy (small: read whole);
4. valid, test, train (smallest first, for the same reason) in row chunks: read a slice, validate
   it, encode it, write it into preallocated ``.npy`` memory maps;
5. write manifest.json last, then rename the temp folder into place.

Memory is bounded by the chunk size (default 500k rows: ~0.4 GB of raw int64 histories at S=100),
never by the split size.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from qin.errors import QinError, os_error
from qin.features.folder import feature_dir_of, up_to_date
from qin.features.io import SPLITS, write_manifest
from qin.features.publish import check_names_free, check_replaceable, mark, publish, remove_stale, temp_name
from qin.features.raw import ITEM_INFO, check_input_file, source_entry, split_file
from qin.features.write import write_folder

if TYPE_CHECKING:
    from qin.config import DataConfig

CHUNK_ROWS = 500_000


@dataclass(frozen=True)
class BuildResult:
    """What `build_features` did: the folder, whether it was (re)built, and the call's wall time."""

    feature_dir: Path
    rebuilt: bool
    seconds: float


def build_features_for(data: DataConfig, force: bool = False, expected_sources: dict[str, str] | None = None,
                       progress: bool = True) -> BuildResult:
    """`build_features` for a data config: its raw folder, item table and max_len, into `feature_dir_of`."""
    item_info = Path(data.item_info) if data.item_info else None
    return build_features(Path(data.raw_dir), feature_dir_of(data), data.max_len, item_info=item_info,
                          force=force, expected_sources=expected_sources, progress=progress)


def build_features(
    raw_dir: Path,
    out_dir: Path,
    max_len: int,
    item_info: Path | None = None,
    force: bool = False,
    progress: bool = True,
    chunk_rows: int = CHUNK_ROWS,
    *,
    expected_sources: dict[str, str] | None = None,
) -> BuildResult:
    """Validate the raw files and write the feature folder ``out_dir`` (see `qin.features.io`).

    Args:
        raw_dir: folder with train/valid/test.parquet (and item_info.parquet unless overridden).
        out_dir: the feature folder to write (usually `feature_dir_for(...)`).
        max_len: L, history items kept per row (the most recent non-zero ones).
        item_info: an alternative item table with item_info.parquet's schema, used instead of
            ``raw_dir/item_info.parquet``.
        force: rebuild even when the manifest says the folder is up to date.
        progress: show rich progress bars and status lines (on stderr).
        chunk_rows: rows per chunk; bounds peak memory (tests use tiny chunks to cross boundaries).
        expected_sources: {input file name (``train.parquet``, ``item_info.parquet``, ...): sha256}
            the inputs must still have (`qin train --resume` passes those its run started from).
            Checked right after hashing, before anything is built or replaced.

    Returns:
        BuildResult; ``rebuilt`` is False when inputs and config matched the existing manifest.

    Raises:
        QinError: a missing or malformed input, naming file, column and first bad row; inputs that
            differ from ``expected_sources``; an existing ``out_dir`` that holds anything a build
            does not write (a run folder, a submission someone saved there: a rebuild would delete
            it), naming up to 5 such paths; or an OS failure writing the folder (a full disk, a
            read-only or non-folder ``out_dir`` parent), in one line; a ``<out_dir>.tmp-<pid>`` /
            ``.old-<pid>`` name the build needs taken by a folder it did not make. Nothing is left
            behind: the build writes to ``<out_dir>.tmp-<pid>`` (marked as its own with
            `publish.TEMP_MARKER`) and deletes it on error.
    """
    start = time.perf_counter()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if max_len < 1:
        raise QinError(f"max_len must be >= 1, got {max_len}")
    if chunk_rows < 1:
        raise QinError(f"chunk_rows must be >= 1, got {chunk_rows}")
    console = Console(stderr=True, quiet=not progress)

    inputs = {f"{split}.parquet": split_file(raw_dir, split) for split in SPLITS}
    inputs[ITEM_INFO] = Path(item_info) if item_info is not None else raw_dir / ITEM_INFO
    for path in inputs.values():
        check_input_file(path)  # missing, a folder or a fifo: said as such
    config = {
        "raw_dir": str(raw_dir.resolve()),
        "item_info": str(inputs[ITEM_INFO].resolve()),
        "max_len": max_len,
    }
    if force:
        check_replaceable(out_dir)  # a certain rebuild: refuse before minutes of hashing
    with console.status("hashing inputs"):
        try:
            sources = {name: source_entry(path) for name, path in inputs.items()}
        except OSError as error:  # e.g. an unreadable input (EACCES)
            raise os_error(error, doing="hashing the inputs") from error
    if expected_sources is not None:
        _check_expected_sources(raw_dir, expected_sources, sources)

    # Also on a no-op: the temp folder of a build killed outright (SIGKILL) is otherwise left forever
    # once the folder it was rebuilding is complete.
    remove_stale(out_dir)
    if not force and up_to_date(out_dir, config, sources):
        console.print(f"[green]features up to date[/]: {out_dir} (inputs and config unchanged)")
        return BuildResult(out_dir, rebuilt=False, seconds=time.perf_counter() - start)
    if not force:
        check_replaceable(out_dir)  # before any work: a refused rebuild costs nothing

    tmp = temp_name(out_dir)
    check_names_free(out_dir, tmp)  # before any work, like the checks above
    made = False  # never delete a folder this call did not make
    try:
        tmp.mkdir(parents=True)  # a features_root that is a file: NotADirectoryError / FileExistsError
        made = True
        mark(tmp)  # first: the proof that the folder is ours, should the build be killed
        manifest = write_folder(inputs, tmp, max_len, chunk_rows, console, config, sources)
        write_manifest(tmp, manifest)  # last: a folder with a manifest is a complete folder
        publish(tmp, out_dir)
    except OSError as error:
        # Reads of the raw files already raise QinError, so this is the output side: a full disk
        # (ENOSPC), a read-only folder (EROFS, EACCES), a file where a folder should be (ENOTDIR).
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        if error.filename is None:  # a failed write() names no file
            error.filename = str(out_dir)
        raise os_error(error, doing="writing the feature folder") from error
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written folder behind.
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    console.print(f"[green]features written[/]: {out_dir} ({seconds:.1f} s)")
    return BuildResult(out_dir, rebuilt=True, seconds=seconds)


def _check_expected_sources(
    raw_dir: Path, expected: dict[str, str], sources: dict[str, dict[str, Any]]
) -> None:
    """Refuse inputs whose sha256 differs from ``expected`` (or that are added or missing)."""
    differing = sorted(
        name for name in expected.keys() | sources.keys()
        if name not in sources or expected.get(name) != sources[name]["sha256"]
    )
    if differing:
        verb = "differs" if len(differing) == 1 else "differ"
        raise QinError(
            f"the raw data changed since the run started ({', '.join(differing)} {verb}; raw folder "
            f"{raw_dir}); its checkpoints were trained on the earlier data, so it cannot be resumed on "
            "this: start a new run (the feature folder was left as it is)"
        )
