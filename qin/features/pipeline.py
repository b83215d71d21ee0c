"""`qin preprocess`: raw challenge parquet files -> a memory-mappable feature folder.

Composition only: reading/writing lives in `io.py`, rules in `validate.py`, transformations in
`steps.py`. The build is

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

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

import qin
from qin.errors import QinError, os_error
from qin.features import steps, validate
from qin.features.io import (
    FORMAT_VERSION,
    ID,
    ITEM_EMB,
    ITEM_ID,
    ITEM_INFO,
    ITEM_SEQ,
    ITEM_TAGS,
    LABEL,
    LIKES_LEVEL,
    MANIFEST,
    SPLITS,
    USER_ID,
    VIEWS_LEVEL,
    check_input_file,
    count_rows,
    open_array,
    read_manifest,
    read_slice,
    reading_parquet,
    row_slices,
    sha256_file,
    source_entry,
    split_file,
    write_manifest,
)

if TYPE_CHECKING:
    from qin.config import DataConfig

CHUNK_ROWS = 500_000
# Small splits first: a bad valid/test file should fail before minutes are spent on train.
BUILD_ORDER: tuple[str, ...] = ("valid", "test", "train")

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

# File names hold at most 255 bytes (ext4, xfs, btrfs, tmpfs, APFS), and the build adds ``.tmp-<pid>`` /
# ``.old-<pid>`` (12 bytes with a 7-digit pid, Linux's largest). A name that fits with that suffix is
# kept as it always was (existing feature folders keep their names); a longer one has its readable
# part cut so that it is at most _SHORT_NAME_BYTES, leaving room for the suffix.
_NAME_MAX_BYTES = 255
_SUFFIX_BYTES = len(".tmp-4194304")
_SHORT_NAME_BYTES = 180


@dataclass(frozen=True)
class BuildResult:
    """What `build_features` did: the folder, whether it was (re)built, and the call's wall time."""

    feature_dir: Path
    rebuilt: bool
    seconds: float


def feature_dir_for(features_root: Path, raw_dir: Path, max_len: int, item_info: Path | None) -> Path:
    """Deterministic feature folder for a raw folder and config,
    e.g. ``features/demo-MicroLens_1M_x1-L32-1a2b3c``.

    An item_info override adds ``-ii<8 hex>``, a hash of its resolved path and content, so two
    embedding tables built side by side never share (and keep rebuilding) one folder.

    A name too long for the file system (with the ``.tmp-<pid>`` suffix the build adds) has its
    readable ``<parent>-<raw name>`` part cut to fit in 180 bytes of UTF-8; the hashes, of the full
    path, keep it unique. Names that fit are never changed.
    """
    # The parent folder is part of the name (data/demo vs data/), hashed with the resolved path, so
    # two data sets with the challenge's folder name never share (and keep rebuilding) one folder.
    raw_dir = Path(raw_dir)
    place = hashlib.sha256(str(raw_dir.resolve()).encode()).hexdigest()[:6]
    tail = f"-L{max_len}-{place}"
    if item_info is not None:
        item_info = Path(item_info)
        check_input_file(item_info)
        digest = hashlib.sha256(f"{item_info.resolve()}\n{sha256_file(item_info)}".encode()).hexdigest()
        tail += f"-ii{digest[:8]}"
    return Path(features_root) / _fitting_name(raw_dir.resolve().parent.name, raw_dir.name, tail)


def feature_dir_of(data: DataConfig) -> Path:
    """The feature folder of a data config (`feature_dir_for` of its fields; an empty item_info is none).

    Callers that need the folder of a config use this rather than rebuilding the call themselves.
    """
    item_info = Path(data.item_info) if data.item_info else None
    return feature_dir_for(Path(data.features_root), Path(data.raw_dir), data.max_len, item_info)


def build_features_for(data: DataConfig, force: bool = False, expected_sources: dict[str, str] | None = None,
                       progress: bool = True) -> BuildResult:
    """`build_features` for a data config: its raw folder, item table and max_len, into `feature_dir_of`."""
    item_info = Path(data.item_info) if data.item_info else None
    return build_features(Path(data.raw_dir), feature_dir_of(data), data.max_len, item_info=item_info,
                          force=force, expected_sources=expected_sources, progress=progress)


def _fitting_name(parent: str, raw: str, tail: str) -> str:
    """``<parent>-<raw><tail>``, with parent and raw cut (the longer one first) when it is too long."""
    name = f"{parent}-{raw}{tail}"
    if _bytes(name) + _SUFFIX_BYTES <= _NAME_MAX_BYTES:
        return name
    budget = max(0, _SHORT_NAME_BYTES - _bytes(tail) - 1)  # bytes for parent and raw together
    raw_bytes = min(_bytes(raw), max(budget // 2, budget - _bytes(parent)))
    return f"{_cut(parent, budget - raw_bytes)}-{_cut(raw, raw_bytes)}{tail}"


def _bytes(text: str) -> int:
    """Length of a file name on disk (UTF-8; undecodable bytes kept as they were)."""
    return len(os.fsencode(text))


def _cut(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that is at most ``limit`` bytes, never splitting a character."""
    while _bytes(text) > limit:
        text = text[:-1]
    return text


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
            `TEMP_MARKER`) and deletes it on error.
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
        _check_replaceable(out_dir)  # a certain rebuild: refuse before minutes of hashing
    with console.status("hashing inputs"):
        try:
            sources = {name: source_entry(path) for name, path in inputs.items()}
        except OSError as error:  # e.g. an unreadable input (EACCES)
            raise os_error(error, doing="hashing the inputs") from error
    if expected_sources is not None:
        _check_expected_sources(raw_dir, expected_sources, sources)

    # Also on a no-op: the temp folder of a build killed outright (SIGKILL) is otherwise left forever
    # once the folder it was rebuilding is complete.
    _remove_stale(out_dir)
    if not force and _up_to_date(out_dir, config, sources):
        console.print(f"[green]features up to date[/]: {out_dir} (inputs and config unchanged)")
        return BuildResult(out_dir, rebuilt=False, seconds=time.perf_counter() - start)
    if not force:
        _check_replaceable(out_dir)  # before any work: a refused rebuild costs nothing

    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    _check_names_free(out_dir, tmp)  # before any work, like the checks above
    made = False  # never delete a folder this call did not make
    try:
        tmp.mkdir(parents=True)  # a features_root that is a file: NotADirectoryError / FileExistsError
        made = True
        _mark(tmp)  # first: the proof that the folder is ours, should the build be killed
        manifest = _build(inputs, tmp, max_len, chunk_rows, console, config, sources)
        write_manifest(tmp, manifest)  # last: a folder with a manifest is a complete folder
        _publish(tmp, out_dir)
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


def _build(
    inputs: dict[str, Path],
    out: Path,
    max_len: int,
    chunk_rows: int,
    console: Console,
    config: dict[str, Any],
    sources: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write items/ and every split into ``out``; return the manifest (not yet written)."""
    # Footer-only checks of every file first (cheap), so schema errors anywhere fail fast.
    item_schema = validate.check_columns(inputs[ITEM_INFO], validate.ITEM_INFO_COLUMNS)
    schemas = {
        split: validate.check_columns(_split_path(inputs, split), _required(split)) for split in SPLITS
    }
    n_rows = {}
    for split in SPLITS:
        n_rows[split] = count_rows(_split_path(inputs, split))
        validate.check_not_empty(_split_path(inputs, split), n_rows[split])

    with console.status("item_info: validating and writing item tables"):
        items = _build_items(inputs[ITEM_INFO], item_schema, out / "items")
    console.print(
        f"item_info: {items['item_vocab']} items, tag vocab {items['tag_vocab']}, "
        f"embedding dim {items['mm_dim']}"
    )

    progress = Progress(
        TextColumn("{task.description:<6}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=console,
        disable=console.quiet,
    )
    splits: dict[str, dict[str, Any]] = {}
    with progress:
        tasks = {split: progress.add_task(split, total=n_rows[split]) for split in BUILD_ORDER}
        for split in BUILD_ORDER:
            splits[split] = _build_split(
                _split_path(inputs, split),
                split,
                schemas[split],
                n_rows[split],
                out / split,
                items["item_vocab"],
                max_len,
                chunk_rows,
                progress,
                tasks[split],
            )
    return {
        "format_version": FORMAT_VERSION,
        "max_len": max_len,
        **items,
        "level_vocab": steps.LEVEL_VOCAB,
        "splits": {split: splits[split] for split in SPLITS},
        "sources": sources,
        "config": config,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "qin_version": qin.__version__,
    }


def _split_path(inputs: dict[str, Path], split: str) -> Path:
    """The input path of a split from the ``inputs`` table."""
    return inputs[f"{split}.parquet"]


def _required(split: str) -> dict[str, validate.ColumnKind]:
    """Required columns of a split: label on train/valid; ID (and never label) on test."""
    required = dict(validate.SPLIT_COLUMNS)
    if split == "test":
        required[ID] = validate.ColumnKind.INTEGER
    else:
        required[LABEL] = validate.ColumnKind.BINARY
    return required


def _build_items(path: Path, schema: pl.Schema, out: Path) -> dict[str, Any]:
    """Validate item_info and write item_tags.npy int32 (V, 5) and item_emb.npy float32 (V, D).

    item_info is small (V = 91,718 rows, ~90 MB of float64 embeddings at full size), so it is
    read whole rather than chunked.
    """
    validate.check_not_empty(path, count_rows(path))
    emb_dim = validate.first_list_len(path, ITEM_EMB, schema[ITEM_EMB])
    with reading_parquet(path):
        frame = (
            pl.scan_parquet(path)
            .select(
                pl.col(ITEM_ID),
                steps.as_list(ITEM_TAGS, schema[ITEM_TAGS]),
                steps.as_list(ITEM_EMB, schema[ITEM_EMB]),
            )
            .collect(engine="streaming")
        )
    validate.raise_first_bad(path, frame, validate.item_info_checks(emb_dim))
    assert emb_dim is not None  # a null row 0 embedding failed the checks above
    tags = steps.fixed_width_matrix(frame[ITEM_TAGS], validate.TAGS_PER_ITEM, np.int32)  # (V, 5)
    emb = steps.fixed_width_matrix(frame[ITEM_EMB], emb_dim, np.float32)  # (V, D)
    out.mkdir(parents=True)
    np.save(out / "item_tags.npy", tags)
    np.save(out / "item_emb.npy", emb)
    return {
        "item_vocab": frame.height,
        "tag_vocab": steps.tag_vocab(int(tags.max())),
        "tags_per_item": validate.TAGS_PER_ITEM,
        "mm_dim": emb_dim,
    }


def _build_split(
    path: Path,
    split: str,
    schema: pl.Schema,
    n_rows: int,
    out: Path,
    n_items: int,
    max_len: int,
    chunk_rows: int,
    progress: Progress,
    task: TaskID,
) -> dict[str, Any]:
    """Validate and encode one split chunk by chunk into ``out/*.npy``; return its manifest entry."""
    has_label = split != "test"
    has_id = split == "test"
    seq_len = validate.first_list_len(path, ITEM_SEQ, schema[ITEM_SEQ])
    checks = validate.split_checks(n_items, seq_len, has_label) + (validate.id_checks() if has_id else [])
    raw_columns = [
        pl.col(USER_ID),
        steps.as_list(ITEM_SEQ, schema[ITEM_SEQ]),
        pl.col(ITEM_ID),
        pl.col(LIKES_LEVEL),
        pl.col(VIEWS_LEVEL),
    ]
    raw_columns += [pl.col(LABEL)] if has_label else []
    raw_columns += [pl.col(ID)] if has_id else []
    encode = steps.split_columns(max_len, has_label, has_id)

    # Preallocated memory maps: each chunk is written at its offset and leaves RAM afterwards.
    arrays: dict[str, np.memmap] = {
        ITEM_ID: open_array(out / "item_id.npy", np.int32, (n_rows,)),
        "history": open_array(out / "history.npy", np.int32, (n_rows, max_len)),
        LIKES_LEVEL: open_array(out / "likes_level.npy", np.int8, (n_rows,)),
        VIEWS_LEVEL: open_array(out / "views_level.npy", np.int8, (n_rows,)),
        USER_ID: open_array(out / "user_id.npy", np.int64, (n_rows,)),
    }
    if has_label:
        arrays[LABEL] = open_array(out / "label.npy", np.float32, (n_rows,))
    if has_id:
        arrays[ID] = open_array(out / "ID.npy", np.int64, (n_rows,))

    start = time.perf_counter()
    kept_items = 0
    positives = 0  # counted exactly (a float32 sum of millions of labels would round)
    for offset, length in row_slices(n_rows, chunk_rows):
        raw = read_slice(path, raw_columns, offset, length)
        if raw.height != length:  # the file changed under us, or a reader bug: never write a gap
            raise QinError(f"{path}: expected {length} rows at row {offset}, read {raw.height}")
        validate.raise_first_bad(path, raw, checks, offset)
        encoded = raw.lazy().select(encode).collect()
        history, lengths = steps.left_pad(encoded["history"], max_len)  # (n, L), (n,)
        end = offset + length
        arrays["history"][offset:end] = history
        for name in arrays.keys() - {"history"}:
            arrays[name][offset:end] = encoded[name].to_numpy()
        kept_items += int(lengths.sum())
        if has_label:
            positives += int((encoded[LABEL] == 1).sum())
        progress.advance(task, length)
    if has_label:
        _check_two_classes(path, split, positives, n_rows)
    for array in arrays.values():
        array.flush()
    del arrays
    # A plain line per split too: progress bars do not show in logs written to a file.
    progress.console.print(
        f"{split}: {n_rows:,} rows, mean history {kept_items / n_rows:.2f} of {max_len} kept "
        f"(input length {seq_len}), {time.perf_counter() - start:.1f} s"
    )

    return {
        "rows": n_rows,
        "has_label": has_label,
        "mean_history_len": kept_items / n_rows,  # non-zero items kept per row, after truncation to L
        "positive_rate": positives / n_rows if has_label else None,
        "input_seq_len": seq_len,  # S, the stored history length of the input file
    }


def _check_two_classes(path: Path, split: str, positives: int, n_rows: int) -> None:
    """Refuse a labelled split whose labels are all 0 or all 1.

    On valid, AUC (the challenge metric, and what early stopping and model selection watch) is
    undefined, so training would run for nothing; on train, the model never sees the other class.
    """
    if 0 < positives < n_rows:
        return
    value = 1 if positives == n_rows else 0
    if split == "valid":
        why = (
            "validation AUC is undefined, so early stopping and model selection would have nothing "
            "to measure; use a validation split with both clicks (1) and non-clicks (0)"
        )
    else:
        why = (
            "the model needs both clicks (1) and non-clicks (0) to learn; raw positive-only logs, "
            "for example, need negatives sampled into them first"
        )
    raise QinError(f"{path}: column '{LABEL}' holds only one class (all {n_rows:,} rows are {value}); {why}")


def _up_to_date(out_dir: Path, config: dict[str, Any], sources: dict[str, dict[str, Any]]) -> bool:
    """True when ``out_dir`` is a complete folder built from these exact inputs and config."""
    try:
        manifest = read_manifest(out_dir)
    except QinError:
        return False
    old_sources = manifest.get("sources", {})
    if manifest.get("config") != config or set(old_sources) != set(sources):
        return False
    for name, entry in sources.items():
        old = old_sources[name]
        if old.get("size") != entry["size"] or old.get("sha256") != entry["sha256"]:
            return False
    # A folder someone pruned or damaged by hand is not up to date either: every array must open
    # (its header read through a memory map, no data) with the rows the manifest records.
    # History and the item tables must also be as wide as the manifest says (what `load_features`
    # and `FeatureSet.split` check).
    vocab = manifest.get("item_vocab")
    expected = {
        out_dir / "items" / "item_tags.npy": (vocab, manifest.get("tags_per_item")),
        out_dir / "items" / "item_emb.npy": (vocab, manifest.get("mm_dim")),
    }
    for split, info in manifest.get("splits", {}).items():
        names = ["item_id", "likes_level", "views_level", "user_id"]
        names += ["label"] if info.get("has_label") else []
        names += ["ID"] if split == "test" else []
        expected |= {out_dir / split / f"{name}.npy": (info.get("rows"),) for name in names}
        expected[out_dir / split / "history.npy"] = (info.get("rows"), manifest.get("max_len"))
    return set(manifest.get("splits", {})) == set(SPLITS) and all(
        _array_shape(path)[: len(dims)] == dims for path, dims in expected.items())


def _array_shape(path: Path) -> tuple[int, ...]:
    """Shape of a .npy file whose whole payload is on disk; () when it is missing or damaged."""
    try:
        return tuple(int(n) for n in np.load(path, mmap_mode="r").shape)
    except (OSError, ValueError, EOFError):
        return ()


def _remove_stale(out_dir: Path) -> None:
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
            if int(pid) != os.getpid() and _alive(int(pid)):
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
    a complete feature folder holding nothing a build does not write (the rule `_check_replaceable`
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


def _mark(folder: Path) -> None:
    """Write `TEMP_MARKER` (this process's pid) into a folder the build made or renamed aside."""
    (folder / TEMP_MARKER).write_text(f"{os.getpid()}\n")


def _unmark(folder: Path) -> None:
    """Remove `TEMP_MARKER` from a published folder (best effort: a leftover one is tolerated)."""
    try:
        (folder / TEMP_MARKER).unlink(missing_ok=True)
    except OSError:
        pass


def _check_names_free(out_dir: Path, tmp: Path) -> None:
    """Refuse to build when the temp or old name this build needs is taken by a folder it did not make.

    `_remove_stale` already removed those the build made; anything left there (a user's folder that
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


def _old_name(out_dir: Path) -> Path:
    """Where `_publish` renames an older build aside: ``<out_dir>.old-<pid>``."""
    return out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)  # signal 0: an existence check, sends nothing
    except (ProcessLookupError, OverflowError):  # OverflowError: a pid no process can have
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _check_replaceable(out_dir: Path) -> None:
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


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder to ``out_dir``, replacing an older build.

    The old folder is renamed aside first and deleted only after the new one is in place, so a
    failure at any point leaves either the old or the new complete folder. The old folder gets
    `TEMP_MARKER` right after the rename; killed before that, it is still recognised as the
    build's own by its manifest (`_made_by_qin`).
    """
    old = None
    if out_dir.exists():
        old = _old_name(out_dir)
        if os.path.lexists(old):  # taken since `_check_names_free`: never delete or replace it
            raise _name_taken(old)
        os.replace(out_dir, old)
        try:
            _mark(old)
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
