"""`qin preprocess` under faults: corrupt pages, killed builds, full disks and unwritable folders.

Each fault must end as one `QinError` line naming the file, with no ``.tmp-``/``.old-`` folder
left behind. Raw data comes from the hand-written tiny files of `test_features`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from qin.errors import QinError
from qin.features import feature_dir_for, load_features
from qin.features import pipeline as pipeline_module
from qin.features.io import open_array
from qin.features.publish import TEMP_MARKER
from qin.features.validate import raise_first_bad, split_checks
from tests.test_features import build, leftovers, split_frame, write_raw

# ----------------------------------------------------------------------------- corrupt pages


def corrupt_page(path: Path, column: str, rows_per_group: int) -> None:
    """Rewrite ``path`` in small row groups and overwrite one page header in a middle group.

    The footer stays intact, so the schema and row count read fine and only decoding that page fails.
    Garbage in a page's values can decode silently as other values; a garbage thrift page header
    never does, which keeps the test deterministic.
    """
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=rows_per_group, compression="none", use_dictionary=False)
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups >= 3
    group = metadata.row_group(metadata.num_row_groups // 2)
    chunk = next(
        group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == column
    )
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("file", "column", "rows_per_group"),
    [
        ("train.parquet", "item_id", 2),  # read chunk by chunk (read_slice)
        ("test.parquet", "ID", 2),
        ("item_info.parquet", "item_emb_d128.list.element", 4),  # read whole
    ],
)
def test_corrupt_page_is_one_line_naming_the_file(
    tmp_path: Path, file: str, column: str, rows_per_group: int
) -> None:
    raw = write_raw(tmp_path)
    corrupt_page(raw / file, column, rows_per_group)
    out = tmp_path / "features" / "raw-L5"
    with pytest.raises(QinError) as info:
        build(raw, out)
    message = str(info.value)
    assert message.startswith(f"{raw / file}: cannot read as parquet ("), message
    assert "\n" not in message
    assert not out.exists() and leftovers(tmp_path) == []


def test_raise_first_bad_on_a_corrupt_lazy_scan_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    split_frame(10).write_parquet(path)
    corrupt_page(path, "item_id", 2)
    with pytest.raises(QinError, match=r"train\.parquet: cannot read as parquet"):
        raise_first_bad(path, pl.scan_parquet(path), split_checks(30, 8, has_label=True))


# ----------------------------------------------------------------------------- stale temp folders


def _dead_pid() -> int:
    """The pid of a process that has exited (a build killed with SIGKILL)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_temp_folders_are_removed_when_up_to_date(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    killed = [tmp_path / f"f.tmp-{_dead_pid()}", tmp_path / f"f.old-{_dead_pid()}"]
    for folder in killed:
        (folder / "train").mkdir(parents=True)
        (folder / TEMP_MARKER).write_text("1\n")  # what the build writes first
    live = tmp_path / f"f.tmp-{os.getppid()}"  # a concurrent build of a live process: keep
    live.mkdir()
    (live / TEMP_MARKER).write_text("1\n")

    assert not build(raw, out).rebuilt
    assert not any(folder.exists() for folder in killed) and live.exists()


def _thesis(folder: Path) -> Path:
    """A user's folder that merely has a stale-looking name."""
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "thesis.tex").write_text("years of work")
    return folder


@pytest.mark.parametrize("force", [False, True])
def test_user_folders_with_a_stale_name_are_never_deleted(tmp_path: Path, force: bool) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    mine = [_thesis(tmp_path / f"f.tmp-{_dead_pid()}"), _thesis(tmp_path / f"f.old-{_dead_pid()}"),
            _thesis(tmp_path / f"f.old-{'9' * 30}")]  # no process can have that pid
    # a copy of a feature folder the user put notes in: not only what a build writes
    copied = tmp_path / f"f.old-{_dead_pid()}"
    shutil.copytree(out, copied)
    (copied / "notes.txt").write_text("mine")

    assert build(raw, out, force=force).rebuilt == force  # "features up to date", or a rebuild
    for folder in mine:
        assert (folder / "sub" / "thesis.tex").read_text() == "years of work"
    assert (copied / "notes.txt").read_text() == "mine" and (copied / "manifest.json").is_file()


def test_an_old_build_renamed_aside_before_its_marker_is_removed(tmp_path: Path) -> None:
    """A build killed between renaming the old folder aside and marking it: its manifest proves it."""
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    old = tmp_path / f"f.old-{_dead_pid()}"
    shutil.copytree(out, old)
    not_ours = tmp_path / f"f.tmp-{_dead_pid()}"  # a complete folder, but .tmp- folders need the marker
    shutil.copytree(out, not_ours)
    empty = tmp_path / f"f.tmp-{_dead_pid()}"  # killed between mkdir and the marker: loses nothing
    empty.mkdir()
    assert not build(raw, out).rebuilt
    assert not old.exists() and not empty.exists() and not_ours.exists()


@pytest.mark.parametrize("kind", ["tmp", "old"])
def test_a_user_folder_with_our_temp_name_refuses_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    taken = _thesis(tmp_path / f"f.{kind}-{os.getpid()}")
    monkeypatch.setattr(pipeline_module, "write_folder", _raising(AssertionError("the build started")))
    with pytest.raises(QinError) as info:
        build(raw, out, force=True)
    assert str(info.value) == (
        f"{taken}: exists and was not made by `qin preprocess` (no {TEMP_MARKER} in it); the build "
        "needs this name for a temporary folder, so move or rename it first"
    )
    assert (taken / "sub" / "thesis.tex").read_text() == "years of work"
    assert load_features(out).manifest["format_version"] == 1


def test_the_build_marks_its_temp_and_old_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    seen: dict[str, bool] = {}
    real_build, real_rmtree = pipeline_module.write_folder, shutil.rmtree

    def spy_build(inputs: object, tmp: Path, *args: object) -> object:
        seen["tmp"] = (tmp / TEMP_MARKER).read_text() == f"{os.getpid()}\n"
        return real_build(inputs, tmp, *args)  # type: ignore[arg-type]

    def spy_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        seen[Path(path).name] = (Path(path) / TEMP_MARKER).read_text() == f"{os.getpid()}\n"
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline_module, "write_folder", spy_build)
    monkeypatch.setattr(pipeline_module.shutil, "rmtree", spy_rmtree)
    (out / TEMP_MARKER).write_text("1\n")  # left by a build killed right after publishing: tolerated
    assert build(raw, out, force=True).rebuilt
    assert seen == {"tmp": True, f"f.old-{os.getpid()}": True}  # the old build, deleted once marked
    assert not (out / TEMP_MARKER).exists() and leftovers(tmp_path) == []


def test_stale_cleanup_never_fails_a_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    (tmp_path / f"f.tmp-{_dead_pid()}").mkdir()

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    # Root ignores chmod, so a read-only parent is simulated at both calls that touch it.
    monkeypatch.setattr(pipeline_module.shutil, "rmtree", read_only)
    assert not build(raw, out).rebuilt
    monkeypatch.setattr(Path, "glob", read_only)
    assert not build(raw, out).rebuilt


# ----------------------------------------------------------------------------- full disk, bad folders


def _raising(error: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


def test_full_disk_at_block_reservation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "features" / "raw-L5"
    build(raw, out)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(os, "posix_fallocate", _raising(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(QinError) as info:
        build(raw, out, force=True)
    message = str(info.value)
    # valid is written first: its first memory map names the file that did not fit
    assert message == (
        f"{out.parent / f'raw-L5.tmp-{os.getpid()}' / 'valid' / 'item_id.npy'}: "
        "no space left on the device (writing the feature folder)"
    )
    assert (out / "manifest.json").read_text() == before  # the previous build is kept
    assert leftovers(tmp_path) == []


def test_full_disk_at_np_save_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "features" / "raw-L5"
    monkeypatch.setattr(np, "save", _raising(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(QinError, match="no space left") as info:
        build(raw, out)
    assert str(info.value) == f"{out}: no space left on the device (writing the feature folder)"
    assert not out.exists() and leftovers(tmp_path) == []


def test_interrupt_is_not_converted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    monkeypatch.setattr(os, "posix_fallocate", _raising(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        build(raw, tmp_path / "f")
    assert leftovers(tmp_path) == []


def test_features_root_that_is_a_file(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    root = tmp_path / "features"
    root.write_text("not a folder")
    with pytest.raises(QinError, match="not a folder.*writing the feature folder"):
        build(raw, feature_dir_for(root, raw, 5, None))
    assert root.read_text() == "not a folder"


def test_unreadable_input_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_raw(tmp_path)
    denied = OSError(errno.EACCES, "Permission denied", str(raw / "test.parquet"))
    monkeypatch.setattr(pipeline_module, "source_entry", _raising(denied))
    with pytest.raises(QinError, match=r"test\.parquet: permission denied \(hashing the inputs\)"):
        build(raw, tmp_path / "f")


# ----------------------------------------------------------------------------- block reservation


def test_every_memory_map_is_reserved_in_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    real = os.posix_fallocate

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    array = open_array(tmp_path / "a.npy", np.int32, (1000, 16))
    assert calls == [(array.offset, 1000 * 16 * 4)]
    assert array.offset + array.nbytes == (tmp_path / "a.npy").stat().st_size


@pytest.mark.parametrize("unsupported", ["EOPNOTSUPP", "EINVAL", "missing"])
def test_without_fallocate_zeros_are_written_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unsupported: str
) -> None:
    raw = write_raw(tmp_path)
    build(raw, tmp_path / "expected")
    if unsupported == "missing":  # e.g. macOS has no posix_fallocate
        monkeypatch.delattr(os, "posix_fallocate")
    else:
        code = getattr(errno, unsupported)
        monkeypatch.setattr(os, "posix_fallocate", _raising(OSError(code, os.strerror(code))))
    build(raw, tmp_path / "f")
    expected, got = load_features(tmp_path / "expected"), load_features(tmp_path / "f")
    for split in ("train", "valid", "test"):
        for name in ("item_id", "history", "likes_level", "views_level", "user_id"):
            np.testing.assert_array_equal(
                getattr(got.split(split), name), getattr(expected.split(split), name)
            )


# ----------------------------------------------------------------------------- a real full file system

_BUILD_ON_FULL_DISK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from qin.errors import QinError
    from qin.features import build_features
    try:
        build_features(Path(sys.argv[1]), Path(sys.argv[2]), max_len=64, progress=False)
    except QinError as error:
        print(error)
        sys.exit(2)
    """
)


def test_full_tmpfs_is_an_error_not_sigbus(tmp_path: Path) -> None:
    """A real 512 KiB tmpfs: without block reservation this build dies of SIGBUS (exit 135)."""
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount not permitted here: {mounted.stderr.decode().strip()}")
    try:
        # 3000 rows x 64 history items x 4 bytes = 750 KiB: valid, test and items fit, train does not.
        raw = write_raw(tmp_path, train=split_frame(3000))
        out = disk / "f"
        # In a child process, so a regression kills it and not the test session.
        result = subprocess.run(
            [sys.executable, "-c", _BUILD_ON_FULL_DISK, str(raw), str(out)], capture_output=True, text=True
        )
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert result.stdout.strip().endswith("no space left on the device (writing the feature folder)")
        assert "train" in result.stdout
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------- replacing a feature folder


def test_an_unlistable_feature_folder_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    before = (out / "manifest.json").read_text()
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if Path(str(path)) == out / "train":  # root ignores chmod, so EACCES is simulated
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(QinError) as info:
        build(raw, out, force=True)
    assert str(info.value) == (
        f"{out / 'train'}: permission denied (checking the feature folder before replacing it)"
    )
    assert (out / "manifest.json").read_text() == before and leftovers(tmp_path) == []


def test_a_forced_rebuild_is_refused_before_the_inputs_are_hashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(pipeline_module, "source_entry", _raising(AssertionError("hashed")))
    with pytest.raises(QinError, match=r"\(notes\.txt\); rebuilding replaces the whole folder"):
        build(raw, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
