"""The `qin` command end to end on tiny data, and its error messages."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from qin.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ["synth", "preprocess", "train", "predict", "evaluate", "demo", "embed", "neighbors"]:
        assert command in result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """synth -> preprocess -> train through the CLI, in a temporary folder."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert invoke("synth", "--size", "tiny", "--out", str(data), "--no-images").exit_code == 0
    config = root / "tiny.yaml"
    config.write_text(
        f"base: {Path(__file__).resolve().parent.parent / 'qin.yaml'}\n"
        f"data:\n  raw_dir: {data / 'MicroLens_1M_x1'}\n  features_root: {root / 'features'}\n  max_len: 16\n"
        "model:\n  embedding_dim: 8\n  num_layers: 2\n  num_row: 2\n"
        f"train:\n  batch_size: 256\n  epochs: 3\n  run_root: {root / 'runs'}\n"
    )
    first = invoke("preprocess", "--config", str(config))
    assert first.exit_code == 0, first.output
    again = invoke("preprocess", "--config", str(config))
    assert "up to date" in again.output
    result = invoke("train", "--config", str(config), "--run-dir", str(root / "runs" / "r1"), "--no-progress")
    assert result.exit_code == 0, result.output
    return root, config, data


def test_predict_writes_a_valid_submission(trained):
    root, _, data = trained
    out = root / "sub" / "submission.csv"
    result = invoke("predict", "--run", str(root / "runs" / "r1"), "--out", str(out), "--zip")
    assert result.exit_code == 0, result.output
    frame = pl.read_csv(out)
    test = pl.read_parquet(data / "MicroLens_1M_x1" / "test.parquet")
    assert frame.columns == ["ID", "Task2"]
    assert frame["ID"].to_list() == test["ID"].to_list()
    assert frame["Task2"].min() >= 0 and frame["Task2"].max() <= 1
    with zipfile.ZipFile(out.with_suffix(".zip")) as archive:
        assert archive.namelist() == ["prediction.csv"]
        assert archive.read("prediction.csv") == out.read_bytes()
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["rows"] == test.height and sidecar["config"]["model"]["name"] == "qin"
    assert 0.5 < sidecar["valid_auc"] <= 1


def test_predict_valid_rows_and_evaluate_with_oracle(trained):
    root, _, data = trained
    out = root / "valid.parquet"
    assert invoke("predict", "--run", str(root / "runs" / "r1"), "--split", "valid",
                  "--out", str(out)).exit_code == 0
    frame = pl.read_parquet(out)
    assert frame.columns == ["row", "user_id", "item_id", "likes_level", "views_level", "history_len",
                             "label", "prediction"]
    assert frame.height == pl.read_parquet(data / "MicroLens_1M_x1" / "valid.parquet").height
    result = invoke("evaluate", "--run", str(root / "runs" / "r1"), "--truth", str(data / "hidden"))
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(metrics) == ["rows", "auc", "gauc", "logloss", "ne", "calibration", "oracle_auc",
                             "oracle_gauc", "oracle_logloss", "oracle_ne"]
    assert 0.5 < metrics["auc"] <= metrics["oracle_auc"] + 0.05
    assert 0.5 < metrics["gauc"] <= 1 and 0 < metrics["ne"] < 1 and 0 < metrics["calibration"]


@pytest.mark.parametrize("name", ["dcnv2", "transformer_dcn", "din_sa", "dlf"])
def test_the_zoo_trains_resumes_and_predicts_through_the_cli(trained, name):
    """configs/<name>.yaml under the tiny config's own keys: train, resume the finished run, predict."""
    root, config, _ = trained
    run = root / "zoo" / name
    train = ["train", "-c", f"configs/{name}.yaml", "-c", str(config), "--set", "train.epochs=1",
             "--no-progress"]
    first = invoke(*train, "--run-dir", str(run))
    assert first.exit_code == 0, first.output
    assert f"name: {name}" in (run / "config.yaml").read_text()
    again = invoke(*train, "--resume", str(run))  # a finished run: checks the config, trains nothing
    assert again.exit_code == 0, again.output
    out = root / f"zoo-{name}.csv"
    predicted = invoke("predict", "--run", str(run), "--out", str(out))
    assert predicted.exit_code == 0, predicted.output
    assert pl.read_csv(out)["Task2"].is_between(0, 1).all()


def test_predict_defaults_to_the_newest_run(trained, monkeypatch):
    root, _, _ = trained
    monkeypatch.chdir(root)  # runs/ under the cwd is where the default looks
    result = invoke("predict")
    assert result.exit_code == 0, result.output
    written = Path(result.stdout.strip().splitlines()[-1])
    assert (root / written).is_file() and written.parent.name == "submissions"


def test_clear_errors(tmp_path, trained):
    root, config, _ = trained
    missing = invoke("predict", "--run", str(tmp_path / "no-such-run"))
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output
    corrupt = tmp_path / "bad"
    corrupt.mkdir()
    (corrupt / "best.pt").write_bytes(b"not a checkpoint")
    bad = invoke("predict", "--run", str(corrupt))
    assert bad.exit_code == 2 and "not a readable checkpoint" in bad.output
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {config}\ntrain:\n  learnig_rate: 0.1\n")
    result = invoke("train", "--config", str(typo))
    assert result.exit_code == 2 and "train.learnig_rate" in result.output
    no_config = invoke("train", "--config", str(tmp_path / "none.yaml"))
    assert no_config.exit_code == 2 and "config file not found" in no_config.output
    empty_runs = invoke("evaluate", "--run", str(tmp_path))
    assert empty_runs.exit_code == 2 and "checkpoint not found" in empty_runs.output


def test_neighbors_and_embed_through_the_cli(trained, tmp_path):
    _, _, data = trained
    table = data / "MicroLens_1M_x1" / "item_info.parquet"
    near = invoke("neighbors", "--table", str(table), "-k", "4", "7")
    assert near.exit_code == 0, near.output
    assert "nearest items to 7" in near.output and near.output.count("\n│ ") >= 4
    out = tmp_path / "item_info_precomputed.parquet"
    embedded = invoke("embed", "--from", "precomputed", "--data", str(data), "--dim", "16", "--out", str(out))
    assert embedded.exit_code == 0, embedded.output
    frame = pl.read_parquet(out)
    assert frame.height == pl.read_parquet(table).height
    assert frame["item_emb_d128"].list.len().unique().to_list() == [16]


def test_demo_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parent.parent
    result = invoke("demo", "--size", "tiny", "-c", str(root / "configs" / "demo.yaml"),
                    "--set", "train.epochs=1", "--set", "train.threads=1")
    assert result.exit_code == 0, result.output
    assert "validation AUC" in result.output and "oracle's lift" in result.output
    submission = pl.read_csv(tmp_path / "submissions" / "demo_submission.csv")
    assert submission.columns == ["ID", "Task2"] and submission.height == 1000
