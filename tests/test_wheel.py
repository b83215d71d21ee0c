"""The built wheel alone runs qin: synth -> preprocess -> train -> predict -> report from an empty folder.

The wheel is built from an sdist of a copy of this checkout (so MANIFEST.in and setup.py's build hook are
exercised too) and installed with `--no-deps` into a fresh venv. The venv gets the *dependencies* from this
interpreter's site-packages through a folder of links that leaves qin out (no editable finder, no qin
dist-info), so the only qin it can import is the wheel's; the checkout is never on its sys.path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# Left out of the copy that is built: top-level outputs and what the package does not ship; caches anywhere.
NOT_BUILT = {"benchmarks", "build", "data", "dist", "docs", "features", "runs", "submissions", "tests"}
SMALL_MODEL = ["model.embedding_dim=8", "model.num_layers=2", "model.num_row=2", "model.mlp_hidden=[32,16]",
               "model.din_attention_hidden=[16,8]"]


def not_built(folder: str, names: list[str]) -> set[str]:
    top = NOT_BUILT if Path(folder) == ROOT else set()
    return {n for n in names
            if n in top or n.startswith(".") or n == "__pycache__" or n.endswith(".egg-info")}


def run(command: list[str | Path], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would put the checkout on sys.path; BLAS on one thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """qin-*.whl built offline (no build isolation: this interpreter's setuptools) from an sdist."""
    pytest.importorskip("pip")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=not_built)
    env = clean_env()
    run([sys.executable, "-c", "from setuptools import build_meta; build_meta.build_sdist('../sdist')"],
        source, env)
    (sdist,) = (work / "sdist").glob("qin-*.tar.gz")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--no-cache-dir", "-w", work / "dist", sdist], work, env)
    (built,) = (work / "dist").glob("qin-*.whl")
    return built


def test_the_wheel_carries_the_notebook_and_the_root_configs(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "qin/notebooks/error_analysis.ipynb" in names and "qin/analysis/report.py" in names
        root_configs = [ROOT / "qin.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]
        for path in root_configs:
            packaged = f"qin/defaults/{path.relative_to(ROOT).as_posix()}"
            assert archive.read(packaged) == path.read_bytes(), packaged  # byte-identical to the root copy
        assert archive.read("qin/notebooks/error_analysis.ipynb") == \
            (ROOT / "qin" / "notebooks" / "error_analysis.ipynb").read_bytes()
        assert not [n for n in names if n.startswith(("tests/", "configs/", "notebooks/")) or n == "qin.yaml"]


def dependencies_without_qin(folder: Path) -> Path:
    """A folder of links to every entry of this interpreter's site-packages except qin's own."""
    folder.mkdir()
    paths = sysconfig.get_paths()
    for packages in {paths["purelib"], paths["platlib"], *site.getsitepackages()}:
        if not Path(packages).is_dir():
            continue
        for entry in Path(packages).iterdir():
            name = entry.name
            if (name == "qin" or name.startswith(("qin-", "qin.", "__editable__", "__pycache__"))
                    or name.endswith(".pth") or (folder / name).exists()):
                continue
            (folder / name).symlink_to(entry)
    return folder


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies come from `dependencies_without_qin`."""
    work = tmp_path_factory.mktemp("venv")
    env_dir = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", env_dir], work, clean_env())
    python = env_dir / "bin" / "python"
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], work,
                  clean_env()).strip()
    deps = dependencies_without_qin(work / "deps")
    (Path(purelib) / "zz_qin_test_dependencies.pth").write_text(f"{deps}\n")
    # Data the dependencies installed under their prefix, which an install into the venv would put there:
    # nbconvert's HTML templates (share/jupyter/nbconvert).
    jupyter = Path(sys.prefix) / "share" / "jupyter"
    if jupyter.is_dir():
        (env_dir / "share").mkdir(exist_ok=True)
        (env_dir / "share" / "jupyter").symlink_to(jupyter)
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", wheel], work,
        clean_env())
    return env_dir


def test_the_installed_qin_is_the_wheels(venv, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("import sys, qin, importlib.metadata as m; from qin import analysis; "
            "print(qin.__file__); print(analysis.NOTEBOOK); print(m.distribution('qin').locate_file('')); "
            "print(*sys.path, sep='\\n')")
    lines = run([venv / "bin" / "python", "-c", code], empty, clean_env()).splitlines()
    for path in lines[:3]:
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    entries = [Path(entry or empty).resolve() for entry in lines[3:]]  # "" is the (empty) current folder
    assert not [entry for entry in entries if entry.is_relative_to(ROOT.resolve())], entries
    assert Path(lines[1]).is_file()


def test_the_pipeline_runs_from_an_empty_folder(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = clean_env()
    qin = venv / "bin" / "qin"
    python = venv / "bin" / "python"
    # The packaged configs: each loads (a variant's `base: ../qin.yaml` resolves inside the package).
    code = ("from importlib.resources import files; from qin.config import Config\n"
            "defaults = files('qin') / 'defaults'\n"
            "for path in [defaults / 'qin.yaml', *sorted((defaults / 'configs').iterdir())]:\n"
            "    Config.from_yaml(path)\n"
            "print(defaults / 'qin.yaml')")
    config = run([python, "-c", code], work, env).strip()

    run([qin, "synth", "--size", "tiny", "--out", "data", "--no-images"], work, env)
    sets = [arg for change in ["data.raw_dir=data/MicroLens_1M_x1", "data.max_len=16", *SMALL_MODEL,
                               "train.epochs=1", "train.batch_size=512", "train.eval_batch_size=4096",
                               "train.device=cpu", "train.threads=1"] for arg in ("--set", change)]
    assert Path(config).is_file()
    # `-c qin.yaml` from a folder without one: the installed copy is used.
    run([qin, "preprocess", "-c", "qin.yaml", *sets], work, env)
    run([qin, "train", "-c", "qin.yaml", *sets, "--run-dir", "runs/tiny", "--no-progress"], work, env)
    assert (work / "runs" / "tiny" / "best.pt").is_file()
    submission = Path(run([qin, "predict", "--run", "runs/tiny"], work, env).strip().splitlines()[-1])
    assert (work / submission).is_file() and (work / submission).read_text().startswith("ID,")
    html = Path(run([qin, "report", "--run", "runs/tiny"], work, env, timeout=600).strip().splitlines()[-1])
    assert (work / html).is_file()
    figures = sorted(p.name for p in (work / "runs" / "tiny" / "figures").glob("*.png"))
    assert {"slices.png", "calibration.png", "attention.png", "learning_curves.png"} <= set(figures)
