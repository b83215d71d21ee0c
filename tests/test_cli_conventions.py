"""CLI conventions: --version, --quiet, --json, layered --config, and what a resume may change."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import qin
from qin.cli import app
from qin.config import Config
from qin.errors import QinError
from qin.train import resume_differences
from tests.conftest import ROOT

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"qin {qin.__version__}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("conventions")
    data = root / "data"
    assert invoke("--quiet", "synth", "--size", "tiny", "--out", str(data), "--no-images").exit_code == 0
    sets = ["--set", f"data.raw_dir={data / 'MicroLens_1M_x1'}", "--set", f"data.features_root={root / 'f'}",
            "--set", "data.max_len=8", "--set", "model.embedding_dim=4", "--set", "model.num_layers=1",
            "--set", "train.epochs=1", "--set", "train.batch_size=2048",
            "--set", f"train.run_root={root / 'r'}"]
    result = invoke("--quiet", "train", "-c", str(ROOT / "qin.yaml"), *sets, "--run-dir", str(root / "run"),
                    "--json")
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout.strip().splitlines()[-1])


def test_quiet_train_prints_only_its_json(trained):
    root, summary = trained
    assert summary["run_dir"] == str(root / "run") and 0.5 < summary["valid_auc"] <= 1
    assert set(summary) >= {"valid_auc", "valid_logloss", "best_epoch", "steps", "train_seconds"}


def test_json_output_of_evaluate_and_predict(trained):
    root, summary = trained
    evaluated = invoke("--quiet", "evaluate", "--run", str(root / "run"), "--json")
    assert evaluated.exit_code == 0
    metrics = json.loads(evaluated.stdout)
    assert metrics["auc"] == pytest.approx(summary["valid_auc"])
    out = root / "sub.csv"
    predicted = invoke("--quiet", "predict", "--run", str(root / "run"), "--out", str(out), "--json")
    assert predicted.exit_code == 0
    sidecar = json.loads(predicted.stdout)
    assert sidecar["submission"] == str(out) and sidecar["rows"] == 1000


def test_quiet_still_prints_errors():
    result = invoke("--quiet", "predict", "--run", "/nonexistent/run")
    assert result.exit_code == 2 and "error:" in result.output


def test_layered_configs_keep_each_files_own_settings():
    layered = Config.from_yaml([ROOT / "configs" / "din.yaml", ROOT / "configs" / "budget.yaml"])
    assert layered.model.name.value == "din"  # from din.yaml
    assert layered.train.learning_rate == 1e-3 and layered.model.mlp_hidden == [1024, 512, 256]  # din.yaml
    assert layered.model.embedding_dim == 32 and layered.train.batch_size == 1024  # budget.yaml's own keys
    with pytest.raises(QinError, match="--set: unknown config key"):
        Config.from_yaml([ROOT / "configs" / "din.yaml", ROOT / "configs" / "budget.yaml"], ["train.nope=1"])


def test_a_resume_may_change_runtime_settings_only():
    base = Config().to_dict()
    faster = Config().replace("train", threads=4, eval_batch_size=1024, device="cpu").to_dict()
    assert resume_differences(base, faster) == ""
    changed = Config().replace("train", epochs=5, threads=4).to_dict()
    assert resume_differences(base, changed) == "train.epochs (100 -> 5)"


def test_resume_with_other_threads_continues(trained):
    root, _ = trained
    result = invoke("--quiet", "train", "--resume", str(root / "run"), "--set", "train.threads=2")
    assert result.exit_code == 0, result.output
    refused = invoke("train", "--resume", str(root / "run"), "--set", "train.learning_rate=0.5")
    assert refused.exit_code == 2 and "train.learning_rate (0.002 -> 0.5)" in refused.output


def test_evaluate_the_test_split_against_the_truth(trained):
    root, _ = trained
    result = invoke("--quiet", "evaluate", "--run", str(root / "run"), "--split", "test", "--truth",
                    str(root / "data" / "hidden"), "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["rows"] == 1000 and 0.5 < metrics["auc"] < metrics["oracle_auc"] <= 1
    no_truth = invoke("evaluate", "--run", str(root / "run"), "--split", "test")
    assert no_truth.exit_code == 2 and "pass --truth" in no_truth.output


def test_tensorboard_is_optional_and_said_when_missing(trained, monkeypatch):
    import builtins

    root, _ = trained
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    result = invoke("train", "-c", str(root / "run" / "config.yaml"), "--set", "train.tensorboard=true",
                    "--run-dir", str(root / "tb"), "--no-progress")
    assert result.exit_code == 2 and "needs the tensorboard package" in result.output
    assert not (root / "tb").exists()
