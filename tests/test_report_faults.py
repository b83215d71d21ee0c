"""`qin report` faults: outputs it must not replace, unwritable folders, Ctrl-C, a best.pt given as --run.

Every refusal is checked before the notebook runs: those tests make the notebook client's execute fail
the test if it is called, and the accepted cases stop at it (`Executed`), so no kernel starts. Only the
Ctrl-C tests run a kernel (a two-cell notebook, a few seconds).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import signal
import tempfile
import threading
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from typer.testing import CliRunner

from qin import analysis
from qin.analysis import kernel, report
from qin.cli import app
from qin.errors import QinError


class Executed(Exception):  # noqa: N818 - a signal, not an error: the checks passed and execution began
    """Raised in place of executing the notebook."""


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as far as the report's checks go: best.pt exists (the notebook is never run)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "best.pt").write_bytes(b"not a checkpoint")
    return folder


@pytest.fixture
def no_execution(monkeypatch):
    """Fail the test if the notebook is executed."""

    def fail(self, *args, **kwargs):
        pytest.fail("the notebook was executed; the refusal must come before")

    monkeypatch.setattr(NotebookClient, "execute", fail)
    monkeypatch.setattr(NotebookClient, "async_execute", fail)


@pytest.fixture
def stop_at_execution(monkeypatch) -> list[dict]:
    """Raise `Executed` where the notebook would run; the list gets the keyword arguments of each call."""
    calls: list[dict] = []

    def stop(self, *args, **kwargs):
        calls.append(kwargs)
        raise Executed

    monkeypatch.setattr(NotebookClient, "execute", stop)
    monkeypatch.setattr(NotebookClient, "async_execute", stop)
    return calls


def contents(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (relative) and its bytes (None for a folder or a link)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# 1. Files the report did not write are never replaced or deleted


def test_user_files_in_the_figures_folder_are_refused(run, no_execution):
    figures = run / "figures"
    figures.mkdir()
    (figures / "my_plot.png").write_bytes(b"mine")
    (figures / "notes.txt").write_text("keep me")
    (figures / "slices.png").write_bytes(b"an earlier report's")
    before = contents(run)
    with pytest.raises(QinError) as error:
        analysis.render_report(run)
    message = one_line(error)
    assert str(figures) in message and "my_plot.png" in message and "notes.txt" in message
    assert "slices.png" not in message and "Move" in message
    assert contents(run) == before


def test_a_subfolder_or_link_in_the_figures_folder_is_refused(run, no_execution, tmp_path):
    figures = run / "figures"
    figures.mkdir()
    (figures / "slices.png").mkdir()  # a report name, but a folder
    with pytest.raises(QinError, match="slices.png"):
        analysis.render_report(run)
    (figures / "slices.png").rmdir()
    (tmp_path / "elsewhere.png").write_bytes(b"mine")
    (figures / "calibration.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(QinError, match="calibration.png"):
        analysis.render_report(run)
    assert (tmp_path / "elsewhere.png").read_bytes() == b"mine"


def test_a_file_named_figures_is_refused(run, no_execution):
    (run / "figures").write_text("a file, not a folder")
    with pytest.raises(QinError) as error:
        analysis.render_report(run)
    assert str(run / "figures") in one_line(error) and "not a folder" in str(error.value)
    assert (run / "figures").read_text() == "a file, not a folder"


def test_a_link_named_figures_is_refused(run, no_execution, tmp_path):
    target = tmp_path / "shared_figures"
    target.mkdir()
    (target / "slices.png").write_bytes(b"theirs")
    (run / "figures").symlink_to(target)
    with pytest.raises(QinError, match="symbolic link"):
        analysis.render_report(run)
    assert (run / "figures").is_symlink() and (target / "slices.png").read_bytes() == b"theirs"


def test_a_figures_folder_of_report_figures_is_replaced(run, stop_at_execution):
    figures = run / "figures"
    figures.mkdir()
    for name in ("slices.png", "calibration.png", "calibration-2.png", "attention-13.png"):
        (figures / name).write_bytes(b"an earlier report's")
    with pytest.raises(Executed):
        analysis.render_report(run)
    assert len(stop_at_execution) == 1


def test_figure_names_come_from_the_source_notebooks_tags():
    names = report._figure_names(nbformat.read(analysis.NOTEBOOK, as_version=4))
    assert {"slices", "calibration", "attention", "learning_curves", "slice_calibration", "attention_stats",
            "comparison"} <= names
    ours = {"slices"}
    for name in ("slices.png", "slices-2.png", "slices-10.png"):
        assert report._is_report_figure(name, ours), name
    for name in ("my_plot.png", "slices.PNG", "slices-.png", "slices-x.png", "slices-2.png.bak", "slices",
                 "slices.txt", "other-2.png", ".slices.png"):
        assert not report._is_report_figure(name, ours), name


def test_a_user_written_notebook_at_the_executed_copy_is_refused(run, no_execution):
    mine = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('my own analysis')")])
    nbformat.write(mine, run / "error_analysis.ipynb")
    before = contents(run)
    with pytest.raises(QinError) as error:
        analysis.render_report(run)
    message = one_line(error)
    assert str(run / "error_analysis.ipynb") in message and "not written by `qin report`" in message
    assert "Move" in message
    (run / "error_analysis.ipynb").write_text("not even JSON")
    with pytest.raises(QinError, match="not written by"):
        analysis.render_report(run)
    assert contents(run).keys() == before.keys()


def test_a_folder_or_link_at_the_executed_copy_is_refused(run, no_execution, tmp_path):
    (run / "error_analysis.ipynb").mkdir()
    with pytest.raises(QinError, match="not a regular file"):
        analysis.render_report(run)
    (run / "error_analysis.ipynb").rmdir()
    target = tmp_path / "elsewhere.ipynb"
    notebook = nbformat.read(analysis.NOTEBOOK, as_version=4)
    notebook.metadata["qin"] = {"written_by": "qin report"}  # even a marked one: the link would be replaced
    nbformat.write(notebook, target)
    (run / "error_analysis.ipynb").symlink_to(target)
    with pytest.raises(QinError, match="symbolic link"):
        analysis.render_report(run)


def test_an_executed_copy_qin_wrote_is_replaced(run, stop_at_execution):
    notebook = nbformat.read(analysis.NOTEBOOK, as_version=4)
    notebook.metadata["qin"] = {"written_by": "qin report"}
    notebook.cells[0].source = "# edited after the run: the mark still says qin wrote it"
    nbformat.write(notebook, run / "error_analysis.ipynb")
    with pytest.raises(Executed):
        analysis.render_report(run)
    # Written before the mark existed: the same cells as the source notebook (outputs do not matter).
    legacy = nbformat.read(analysis.NOTEBOOK, as_version=4)
    code = next(cell for cell in legacy.cells if cell.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="executed output")]
    nbformat.write(legacy, run / "error_analysis.ipynb")
    with pytest.raises(Executed):
        analysis.render_report(run)
    assert len(stop_at_execution) == 2


def test_an_unmarked_copy_of_an_earlier_notebook_is_replaced(run, stop_at_execution, monkeypatch):
    """Written before the mark by an earlier version of the notebook (e.g. before it moved into the package):
    recognised by the hash of its cell sources."""
    earlier = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# an earlier notebook"),
                                              nbformat.v4.new_code_cell("RUN_DIR = 'x'")])
    nbformat.write(earlier, run / "error_analysis.ipynb")
    with pytest.raises(QinError, match="not written by"):
        analysis.render_report(run)
    digest = hashlib.sha256(json.dumps([cell.source for cell in earlier.cells]).encode()).hexdigest()
    monkeypatch.setattr(report, "EARLIER_NOTEBOOKS", frozenset({digest}))
    with pytest.raises(Executed):
        analysis.render_report(run)
    assert len(stop_at_execution) == 1


def test_the_executed_copy_is_marked(run, monkeypatch):
    """The notebook handed to the kernel, and so every executed copy written, carries the mark."""
    seen = []

    def stop(self, *args, **kwargs):
        seen.append(dict(self.nb.metadata))
        raise Executed

    monkeypatch.setattr(NotebookClient, "async_execute", stop)
    with pytest.raises(Executed):
        analysis.render_report(run)
    assert seen[0]["qin"] == {"written_by": "qin report"}
    marked = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("other cells")],
                                      metadata={"qin": seen[0]["qin"]})
    nbformat.write(marked, run / "copy.ipynb")
    source = nbformat.read(analysis.NOTEBOOK, as_version=4)
    assert report._is_report_notebook(run / "copy.ipynb", source)


def test_an_html_inside_the_figures_folder_is_refused(run, no_execution):
    with pytest.raises(QinError, match="replaces as a whole"):
        analysis.render_report(run, out_html=run / "figures" / "report.html")


def test_refusals_through_the_cli_are_one_line(run, no_execution):
    (run / "figures").mkdir()
    (run / "figures" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["report", "--run", str(run)])
    assert result.exit_code == 2, result.output
    assert "notes.txt" in result.output and "Traceback" not in result.output
    assert (run / "figures" / "notes.txt").read_text() == "keep me"


def test_figures_swap_puts_the_old_folder_back_on_an_interrupt(tmp_path, monkeypatch):
    folder = tmp_path / "figures"
    folder.mkdir()
    (folder / "slices.png").write_bytes(b"old")
    cell = nbformat.v4.new_code_cell("x", metadata={"tags": ["figure:slices"]})
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})]
    replace = os.replace

    def interrupted_swap(src, dst):
        if Path(dst) == folder and Path(src).name.startswith(".figures."):  # the fresh folder moving in
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(report.os, "replace", interrupted_swap)
    with pytest.raises(KeyboardInterrupt):
        report._write_figures(nbformat.v4.new_notebook(cells=[cell]), folder)
    assert contents(tmp_path) == {"figures": None, "figures/slices.png": b"old"}


# ---------------------------------------------------------------------------------------------------------
# 2. An unwritable output folder is found before the notebook runs


def read_only(monkeypatch, *folders: Path) -> None:
    """Creating a file in any of `folders` fails as on a read-only file system (chmod does not stop root)."""
    blocked = {folder.resolve() for folder in folders}
    original = tempfile.NamedTemporaryFile

    def named_temporary_file(*args, **kwargs):
        folder = Path(kwargs.get("dir") or tempfile.gettempdir()).resolve()
        if folder in blocked:
            raise OSError(errno.EROFS, "Read-only file system", str(folder / ".probe"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", named_temporary_file)


def test_a_read_only_run_folder_is_found_before_executing(run, tmp_path, monkeypatch, no_execution):
    read_only(monkeypatch, run)
    with pytest.raises(QinError) as error:
        analysis.render_report(run, out_html=tmp_path / "elsewhere" / "report.html")
    assert one_line(error) == f"{run}: the file system is read-only (writing the report)"
    assert not (tmp_path / "elsewhere").exists()


def test_a_read_only_html_folder_is_found_before_executing(run, tmp_path, monkeypatch, no_execution):
    out = tmp_path / "reports"
    out.mkdir()
    read_only(monkeypatch, out)
    with pytest.raises(QinError) as error:
        analysis.render_report(run, out_html=out / "report.html")
    assert one_line(error) == f"{out}: the file system is read-only (writing the report)"
    # An HTML folder still to be made: its nearest existing parent must be writable.
    with pytest.raises(QinError, match="read-only"):
        analysis.render_report(run, out_html=out / "new" / "deeper" / "report.html")
    assert not (out / "new").exists()


def test_a_read_only_figures_folder_is_found_before_executing(run, monkeypatch, no_execution):
    (run / "figures").mkdir()  # swapping it out moves it, which needs it writable
    read_only(monkeypatch, run / "figures")
    with pytest.raises(QinError, match="figures: the file system is read-only"):
        analysis.render_report(run)


def test_read_only_through_the_cli_is_one_line(run, tmp_path, monkeypatch, no_execution):
    read_only(monkeypatch, run)
    result = CliRunner().invoke(app, ["report", "--run", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 2, result.output
    assert "read-only" in result.output and "Traceback" not in result.output


def test_a_file_above_the_html_is_named_before_executing(run, tmp_path, no_execution):
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(QinError) as error:
        analysis.render_report(run, out_html=tmp_path / "notes.txt" / "report.html")
    assert one_line(error).startswith(f"{tmp_path / 'notes.txt'}: a path component is a file")


def test_the_write_probe_leaves_nothing_behind(run, tmp_path, stop_at_execution):
    out = tmp_path / "reports"
    out.mkdir()
    before = contents(tmp_path)
    with pytest.raises(Executed):
        analysis.render_report(run, out_html=out / "report.html")
    assert contents(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------
# 3. Ctrl-C stops the kernel quietly


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt, as in a terminal (a background job may have it ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupting_notebook(path: Path, pid_file: Path) -> Path:
    """A notebook whose second cell records the kernel's pid, presses Ctrl-C on qin and keeps running."""
    cells = [
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell(
            "import os, signal, time\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "os.kill(int(os.environ['JPY_PARENT_PID']), signal.SIGINT)\n"
            "time.sleep(60)", metadata={"tags": ["figure:never"]}),
    ]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def process_gone(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return True
    return "zombie" in status.read_text()


def test_ctrl_c_stops_the_kernel_and_writes_nothing(run, tmp_path, ctrl_c_raises):
    notebook = interrupting_notebook(tmp_path / "interrupt.ipynb", tmp_path / "kernel.pid")
    before = contents(run)
    with pytest.raises(KeyboardInterrupt) as error:
        analysis.render_report(run, notebook=notebook, timeout=120)
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no DeadKernelError chain
    pid = int((tmp_path / "kernel.pid").read_text())
    assert process_gone(pid), f"kernel {pid} still running"
    assert contents(run) == before  # no executed copy, no HTML, no figures, no temporary files
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_through_the_cli_is_quiet(run, tmp_path, monkeypatch, ctrl_c_raises):
    notebook = interrupting_notebook(tmp_path / "interrupt.ipynb", tmp_path / "kernel.pid")
    monkeypatch.setattr(report, "NOTEBOOK", notebook)
    result = CliRunner().invoke(app, ["report", "--run", str(run)])
    # A KeyboardInterrupt reached the CLI (typer exits 130, as a shell reports Ctrl-C), not another error.
    assert isinstance(result.exception, SystemExit) and result.exit_code in (1, 130), repr(result.exception)
    assert "Traceback" not in result.output and "DeadKernelError" not in result.output
    assert len(result.output.strip().splitlines()) <= 1
    assert process_gone(int((tmp_path / "kernel.pid").read_text()))
    assert sorted(p.name for p in run.iterdir()) == ["best.pt"]


def kernel_children() -> list[int]:
    """Live ipykernel processes started by this one."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"ipykernel_launcher" in cmdline:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_ctrl_c_at_any_moment_leaves_no_kernel(run, tmp_path, ctrl_c_raises, delay):
    """Ctrl-C while the kernel starts or a cell runs (whichever the delay hits): no kernel survives."""
    notebook = tmp_path / "slow.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time; time.sleep(30)")]),
                   notebook)
    assert kernel_children() == []
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            analysis.render_report(run, notebook=notebook, timeout=120)
    finally:
        timer.cancel()
    assert kernel_children() == []
    assert sorted(p.name for p in run.iterdir()) == ["best.pt"]


class FakeClient:
    """Stands in for the notebook client: runs until cancelled, then cleans up like nbclient does."""

    def __init__(self, cancelled_as: type[BaseException] | None = None):
        self.shutdown_kernel = "graceful"
        self.cleaned_up = False
        self.cancelled_as = cancelled_as

    async def async_execute(self, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if self.cancelled_as is not None:  # nbclient turns a cancelled cell into DeadKernelError
                raise self.cancelled_as("Kernel died") from None
            raise
        finally:
            await asyncio.sleep(0)  # the cleanup may await (the kernel shutdown does)
            self.cleaned_up = True


@pytest.mark.parametrize("cancelled_as", [None, RuntimeError])
def test_execute_turns_ctrl_c_into_keyboard_interrupt_after_cleanup(ctrl_c_raises, cancelled_as):
    client = FakeClient(cancelled_as)
    with pytest.raises(KeyboardInterrupt):
        kernel.execute(client)
    assert client.cleaned_up and client.shutdown_kernel == "immediate"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_execute_leaves_an_ignored_sigint_alone():
    class Quick:
        shutdown_kernel = "graceful"

        async def async_execute(self, **kwargs):
            await asyncio.sleep(0)
            return "done"

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        kernel.execute(Quick())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------------------------
# 4. --run RUN/best.pt


def test_a_best_pt_path_means_its_run_folder(run, stop_at_execution):
    with pytest.raises(Executed):
        analysis.render_report(run / "best.pt")
    assert stop_at_execution[0]["env"]["QIN_RUN_DIR"] == str(run.resolve())


def test_best_pt_through_the_cli(run, stop_at_execution):
    result = CliRunner().invoke(app, ["report", "--run", str(run / "best.pt")])
    assert isinstance(result.exception, Executed), result.output
    assert stop_at_execution[0]["env"]["QIN_RUN_DIR"] == str(run.resolve())


def test_another_file_as_the_run_is_named(run, no_execution):
    (run / "last.pt").write_bytes(b"x")
    with pytest.raises(QinError, match="is a file; pass the run folder"):
        analysis.render_report(run / "last.pt")
    with pytest.raises(QinError, match="no best.pt"):
        analysis.render_report(run / "missing")


# ---------------------------------------------------------------------------------------------------------
# 5. A second run to compare with (--compare)


def test_a_compare_run_that_is_not_a_finished_run_is_refused(run, tmp_path, no_execution):
    with pytest.raises(QinError, match=r"^the run to compare with: .*missing: not a finished run \(no best"):
        analysis.render_report(run, compare_run=tmp_path / "missing")
    (tmp_path / "last.pt").write_bytes(b"x")
    with pytest.raises(QinError, match="is a file; pass the run folder"):
        analysis.render_report(run, compare_run=tmp_path / "last.pt")
    assert not (run / "error_analysis.ipynb").exists()


def test_the_compare_run_reaches_the_kernel_and_keeps_the_comparison_cells(run, tmp_path, monkeypatch):
    other = tmp_path / "other"
    other.mkdir()
    (other / "best.pt").write_bytes(b"not a checkpoint")
    seen: list[tuple[dict, list]] = []

    def stop(self, *args, **kwargs):
        seen.append((kwargs["env"], [cell.metadata.get("tags", []) for cell in self.nb.cells]))
        raise Executed

    monkeypatch.setattr(NotebookClient, "async_execute", stop)
    monkeypatch.setenv("QIN_COMPARE_RUN_DIR", str(other))  # a stale variable of the shell is not passed on
    with pytest.raises(Executed):
        analysis.render_report(run)
    with pytest.raises(Executed):
        analysis.render_report(run, compare_run=other / "best.pt")  # a best.pt means its run folder
    (without_env, without_tags), (with_env, with_tags) = seen
    assert "QIN_COMPARE_RUN_DIR" not in without_env
    assert with_env["QIN_COMPARE_RUN_DIR"] == str(other.resolve())
    source = nbformat.read(analysis.NOTEBOOK, as_version=4)
    compare = sum(analysis.COMPARE_TAG in cell.metadata.get("tags", []) for cell in source.cells)
    assert compare >= 5 and len(with_tags) == len(source.cells)
    assert len(without_tags) == len(source.cells) - compare
    assert not any(analysis.COMPARE_TAG in tags for tags in without_tags)


def test_a_comparison_figure_of_an_earlier_report_is_replaced_without_a_compare_run(run, stop_at_execution):
    figures = run / "figures"
    figures.mkdir()
    (figures / "comparison.png").write_bytes(b"an earlier report's")
    with pytest.raises(Executed):
        analysis.render_report(run)
    assert len(stop_at_execution) == 1
