"""`qin report`: execute the error-analysis notebook for a run and write it out with its figures.

Every output is checked before the notebook runs: files qin did not write are never replaced, and each
folder written to must be writable. The notebook is package data (`qin/notebooks/error_analysis.ipynb`),
found with importlib.resources, so an installed wheel has it too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from qin.analysis.kernel import execute, notebook_client_class, this_python_kernel_manager
from qin.errors import QinError, os_error
from qin.files import atomic_write_bytes, atomic_write_text, check_replaceable, folder_mode

if TYPE_CHECKING:
    from nbformat import NotebookNode

NOTEBOOK = files("qin") / "notebooks" / "error_analysis.ipynb"  # package data; a Path unless qin is zipped
FIGURE_TAG = "figure:"  # a code cell tagged "figure:<name>" saves its images as figures/<name>.png
COMPARE_TAG = "compare"  # cells of the two-run comparison: left out of a report without a compare run


@dataclass(frozen=True)
class Report:
    html: Path
    notebook: Path  # the executed copy
    figures: list[Path]
    seconds: float


def render_report(run_dir: Path | str, out_html: Path | str | None = None,
                  truth_dir: Path | str | None = None, feature_dir: Path | str | None = None,
                  notebook: Path | str | None = None, timeout: int = 1800,
                  compare_run: Path | str | None = None) -> Report:
    """Execute the error-analysis notebook for `run_dir` and write it out with its figures.

    Writes (each atomically) `<run_dir>/error_analysis.ipynb` (executed, marked as written by qin in its
    metadata; also when a cell fails, for inspection), `out_html` (default `<run_dir>/error_analysis.html`)
    and `<run_dir>/figures/<name>.png` for every image of a cell tagged `figure:<name>` (the folder is
    replaced as a whole). The kernel is this interpreter's ipykernel, started in the current folder (a
    run's paths are relative to it) with QIN_RUN_DIR (and QIN_TRUTH_DIR, QIN_FEATURE_DIR when given) in
    its environment.

    `compare_run` (a second run folder or its best.pt) adds the side-by-side comparison: the kernel gets
    QIN_COMPARE_RUN_DIR, and the cells tagged `compare` run (without it they are left out of the report).
    Both runs must have scored the same validation rows; the notebook refuses otherwise.

    Before the notebook runs, every output is checked: an existing HTML must be an earlier qin report,
    an existing executed copy must be one qin wrote, `figures/` may hold only the PNGs this report
    writes, no output may be a symbolic link, and each folder written to must be writable.

    `run_dir` may also be the run's best.pt (its folder is used).

    Raises:
        QinError: the run folder or notebook is missing, an output is not replaceable or its folder not
            writable, the notebook tools are not installed, the kernel died, or a cell raised (naming the
            error).
        KeyboardInterrupt: Ctrl-C while the notebook runs; the kernel is stopped and nothing is written.
    """
    try:
        import nbformat
        from nbclient.exceptions import CellExecutionError, DeadKernelError
        from nbconvert import HTMLExporter
    except ImportError as error:
        raise QinError(f"`qin report` needs the notebook tools ({error.name} is missing): "
                       "pip install -e '.[dev]'") from error

    started = time.perf_counter()
    run_dir = _report_run_dir(Path(run_dir))
    compare_dir = None
    if compare_run is not None:
        try:
            compare_dir = _report_run_dir(Path(compare_run))
        except QinError as error:
            raise QinError(f"the run to compare with: {error}") from error
    html = Path(out_html) if out_html is not None else run_dir / "error_analysis.html"
    if html.suffix.lower() != ".html":
        raise QinError(f"{html}: the report is an .html file; use --out NAME.html")
    check_replaceable(html, _is_report_html, "an earlier qin report")
    figures_dir = run_dir / "figures"
    if figures_dir.resolve() in html.resolve().parents:
        raise QinError(f"{html}: is inside {figures_dir}, which `qin report` replaces as a whole; "
                       "choose another --out")
    source = Path(notebook) if notebook is not None else NOTEBOOK
    if not source.is_file():
        raise QinError(f"notebook not found: {source}")
    nb = nbformat.reads(source.read_text(encoding="utf-8"), as_version=4)
    executed = run_dir / "error_analysis.ipynb"
    _check_executed_copy(executed, nb)
    _check_figures_folder(figures_dir, _figure_names(nb))  # every figure of the notebook, comparison included
    if compare_dir is None:
        nb.cells = [cell for cell in nb.cells if COMPARE_TAG not in cell.get("metadata", {}).get("tags", [])]
    for folder in _output_folders(run_dir, figures_dir, html):
        _check_writable(folder)

    nb.metadata["qin"] = dict(REPORT_MARK)  # lets the next report replace this executed copy
    env = {**os.environ, "QIN_RUN_DIR": str(run_dir.resolve()),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    for name, value in (("QIN_TRUTH_DIR", truth_dir), ("QIN_FEATURE_DIR", feature_dir),
                        ("QIN_COMPARE_RUN_DIR", compare_dir)):
        env.pop(name, None)
        if value is not None:
            env[name] = str(Path(value).resolve())
    client = notebook_client_class()(nb, kernel_manager_class=this_python_kernel_manager(), timeout=timeout,
                                      resources={"metadata": {"path": str(Path.cwd())}})
    # The kernel's own stderr (start-up warnings, a crash before it can report) goes to a scratch file:
    # cell output reaches the notebook over the kernel protocol, and a crash is quoted in the error.
    with tempfile.TemporaryFile() as kernel_log:
        try:
            execute(client, env=env, stderr=kernel_log)
        except CellExecutionError as error:
            # The failed copy goes beside the last good one, which stays in step with the HTML.
            failed = executed.with_name(f"{executed.stem}.failed{executed.suffix}")
            atomic_write_text(failed, nbformat.writes(nb))
            raise QinError(f"{source.name} failed for {run_dir} (executed copy: {failed}): "
                           f"{getattr(error, 'ename', '')}: {getattr(error, 'evalue', error)}") from error
        except (DeadKernelError, RuntimeError) as error:
            kernel_log.seek(0)
            tail = kernel_log.read().decode(errors="replace")[-2000:]
            raise QinError(f"the notebook kernel failed ({error}); its log ends with:\n{tail}") from error
    atomic_write_text(executed, nbformat.writes(nb))
    body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": _notebook_stem()}})
    atomic_write_text(html, body)
    figures = _write_figures(nb, figures_dir)
    return Report(html=html, notebook=executed, figures=figures, seconds=time.perf_counter() - started)


REPORT_MARK = {"written_by": "qin report"}  # metadata["qin"] of every executed copy `qin report` writes
# sha256 of the JSON list of cell sources of earlier versions of the notebook: an unmarked executed copy of
# one of them was written by `qin report` too (the notebook at notebooks/, before it moved into the package).
EARLIER_NOTEBOOKS = frozenset({"5f3e4a5caaf9c1dcbfdcb05587f285212fd80a0b56b1311267bacd240fc0a17b"})


def _report_run_dir(path: Path) -> Path:
    """The run folder: `path` itself, or the folder of a best.pt given instead."""
    if path.is_file():
        if path.name == "best.pt":
            return path.parent
        raise QinError(f"{path}: is a file; pass the run folder (the one holding best.pt)")
    if not (path / "best.pt").is_file():
        raise QinError(f"{path}: not a finished run (no best.pt)")
    return path


def _is_report_html(path: Path) -> bool:
    """An HTML page exported from the error-analysis notebook (its title names the notebook)."""
    with path.open("rb") as handle:
        head = handle.read(4096).decode("utf-8", errors="replace")
    return f"<title>{_notebook_stem()}</title>" in head


def _notebook_stem() -> str:
    return PurePath(NOTEBOOK.name).stem  # NOTEBOOK is a Traversable: it has a name, maybe no stem


def _is_report_notebook(path: Path, source: NotebookNode) -> bool:
    """An executed copy `qin report` wrote: marked so in its metadata, or (written before the mark) with
    the same cells as the source notebook or as an earlier version of it (`EARLIER_NOTEBOOKS`)."""
    import nbformat

    try:
        existing = nbformat.read(path, as_version=4)
    except Exception:  # not JSON, not a notebook, not UTF-8: nbformat raises several types
        return False
    mark = existing.get("metadata", {}).get("qin")
    if isinstance(mark, Mapping) and mark.get("written_by") == REPORT_MARK["written_by"]:
        return True
    sources = [cell.get("source") for cell in existing.get("cells", [])]
    if sources == [cell.source for cell in source.cells]:
        return True
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest() in EARLIER_NOTEBOOKS


def _check_executed_copy(path: Path, source: NotebookNode) -> None:
    """Refuse to replace `<run>/error_analysis.ipynb` unless it is an executed copy qin wrote."""
    if path.is_symlink():
        raise QinError(f"{path}: is a symbolic link; `qin report` writes its executed notebook there and "
                       "would replace the link. Move it away and run again")
    if not path.exists():
        return
    if not path.is_file():
        raise QinError(f"{path}: exists and is not a regular file; `qin report` writes its executed notebook "
                       "there. Move it away and run again")
    if not _is_report_notebook(path, source):
        raise QinError(f"{path}: exists and was not written by `qin report`; not replacing it. "
                       "Move it away and run again")


def _figure_name(cell: NotebookNode) -> str | None:
    """<name> of a code cell tagged figure:<name> (the first such tag); None for any other cell."""
    tags = cell.get("metadata", {}).get("tags", [])
    names = [t[len(FIGURE_TAG):] for t in tags if t.startswith(FIGURE_TAG)]
    return names[0] if cell.cell_type == "code" and names else None


def _figure_names(nb: NotebookNode) -> set[str]:
    return {name for cell in nb.cells if (name := _figure_name(cell)) is not None}


def _is_report_figure(file_name: str, names: set[str]) -> bool:
    """Whether `file_name` is one the report writes for these figure names: <name>.png or <name>-<k>.png."""
    if not file_name.endswith(".png"):
        return False
    stem = file_name[: -len(".png")]
    base, dash, k = stem.rpartition("-")
    return stem in names or (dash == "-" and k.isascii() and k.isdigit() and base in names)


def _check_figures_folder(folder: Path, names: set[str]) -> None:
    """Refuse to replace `<run>/figures` unless it is a folder of figures this report writes."""
    if folder.is_symlink():
        raise QinError(f"{folder}: is a symbolic link; `qin report` replaces its figures folder as a whole. "
                       "Move it away and run again")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise QinError(f"{folder}: exists and is not a folder; `qin report` writes its figures there. "
                       "Move it away and run again")
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        raise os_error(error, doing="reading the figures folder", path=folder) from error
    foreign = [e.name for e in entries
               if not (e.is_file(follow_symlinks=False) and _is_report_figure(e.name, names))]
    if foreign:
        shown = ", ".join(ascii(name) if not name.isprintable() else name for name in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise QinError(f"{folder}: holds files `qin report` did not write ({shown}{more}) and the report "
                       "replaces this folder as a whole; not replacing it. Move it (or them) away and run "
                       "again")


def _output_folders(run_dir: Path, figures_dir: Path, html: Path) -> list[Path]:
    """The folders the report creates files in (or, for a folder still to be made, its nearest existing
    parent), each once."""
    candidates = [run_dir, *([figures_dir] if figures_dir.is_dir() else [])]  # the swap moves figures/
    candidates.append(next(p for p in (html.parent, *html.parent.parents) if p.exists() or p.is_symlink()))
    folders: dict[Path, Path] = {}
    for folder in candidates:
        folders.setdefault(folder.resolve(), folder)
    return list(folders.values())


def _check_writable(folder: Path) -> None:
    """Create and delete a scratch file in `folder`: a read-only folder fails here, before the notebook
    runs for minutes."""
    try:
        with tempfile.NamedTemporaryFile(prefix=".qin-report-probe.", dir=folder):
            pass
    except OSError as error:  # named by the folder, not by the scratch file's random name
        raise os_error(OSError(error.errno, error.strerror or str(error)), doing="writing the report",
                       path=folder) from error


def _figure_images(nb: NotebookNode) -> list[tuple[str, bytes]]:
    """(file name, PNG bytes) for each image of each cell tagged figure:<name>."""
    images = []
    for cell in nb.cells:
        name = _figure_name(cell)
        if name is None:
            continue
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        for k, png in enumerate(pngs):
            images.append((f"{name}.png" if k == 0 else f"{name}-{k + 1}.png", base64.b64decode(png)))
    return images


def _write_figures(nb: NotebookNode, folder: Path) -> list[Path]:
    """Write the figures to a fresh folder next to `folder`, then swap it in (no stale PNGs survive).

    `folder` was checked to hold only figures of this report (`_check_figures_folder`). On any failure,
    an interrupt included, the previous folder is put back and the fresh one removed.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    old: Path | None = None
    try:
        os.chmod(fresh, folder_mode())  # mkdtemp makes it 0700; a report is meant to be shared
        for name, data in _figure_images(nb):
            atomic_write_bytes(fresh / name, data)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / folder.name)
        os.replace(fresh, folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        if old is not None:
            if (old / folder.name).exists() and not folder.exists():
                os.replace(old / folder.name, folder)  # put the previous figures back
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return sorted(folder.glob("*.png"))
