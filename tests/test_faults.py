"""The reliability battery as tests: kill, resume, collide, corrupt, fill the disk.

Each test reproduces a case a user hit (docs/reliability.md lists them) on tiny data and asserts what a
careful user expects: nothing qin did not create is replaced, every failure is one `error:` line with
exit code 2, checkpoints are verified, and an interrupted run resumes to the same weights.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from qin.checkpoints import DIGESTS, load_checkpoint
from qin.cli import app
from qin.config import Config
from qin.errors import QinError
from qin.features.io import load_features
from qin.train import check_loss, fit
from tests.conftest import ROOT, tiny_config

runner = CliRunner()


def log_text(output: str) -> str:
    """A command's log as one line: rich wraps long messages at the console width and prints the source
    location (`loop.py:92`) beside them, so a phrase can be split across lines and around that column."""
    return " ".join(re.sub(r"\S+\.py:\d+", " ", output).split())


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(result) -> str:
    """The CLI's message, checked to be a single `error:` line (no traceback) with exit code 2."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "Traceback" not in result.output, result.output
    return " ".join(lines)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """synth -> preprocess -> train (2 epochs) through the CLI; returns (root, config path, run dir)."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    assert invoke("synth", "--size", "tiny", "--out", str(data), "--no-images").exit_code == 0
    config = root / "tiny.yaml"
    config.write_text(
        f"base: {ROOT / 'qin.yaml'}\n"
        f"data:\n  raw_dir: {data / 'MicroLens_1M_x1'}\n  features_root: {root / 'features'}\n  max_len: 16\n"
        "model:\n  embedding_dim: 8\n  num_layers: 2\n  num_row: 2\n"
        f"train:\n  batch_size: 512\n  epochs: 2\n  seed: 3\n  threads: 1\n  run_root: {root / 'runs'}\n"
    )
    result = invoke("train", "-c", str(config), "--run-dir", str(root / "runs" / "done"), "--no-progress")
    assert result.exit_code == 0, result.output
    return root, config, root / "runs" / "done"


# --------------------------------------------------------------------------------------------------
# Nothing qin did not create is replaced


def test_train_refuses_an_existing_run_folder_without_resume_or_overwrite(run):
    root, config, done = run
    before = {name: sha256(done / name) for name in ("best.pt", "last.pt", "metrics.jsonl", "result.json")}
    message = one_error_line(invoke("train", "-c", str(config), "--run-dir", str(done), "--no-progress"))
    assert "already holds a finished run" in message and "--resume" in message and "--overwrite" in message
    assert before == {name: sha256(done / name) for name in before}


def test_train_overwrite_replaces_only_a_runs_files(run, tmp_path):
    root, config, done = run
    copy = tmp_path / "copy"
    shutil.copytree(done, copy)
    (copy / "notes.txt").write_text("mine")
    result = invoke("train", "-c", str(config), "--set", "train.epochs=1", "--run-dir", str(copy),
                    "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert (copy / "notes.txt").read_text() == "mine"
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 1  # the new 1-epoch run only


def test_train_never_uses_a_folder_that_is_not_a_run(run, tmp_path):
    _, config, _ = run
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("x")
    for extra in ([], ["--overwrite"]):
        message = one_error_line(invoke("train", "-c", str(config), "--run-dir", str(folder), *extra))
        assert "not a qin run folder" in message
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("name", ["pred.json", "sub.zip", "sub.parquet"])
def test_predict_refuses_outputs_that_collide_with_its_sidecar_or_zip(run, tmp_path, name):
    _, _, done = run
    message = one_error_line(invoke("predict", "--run", str(done), "--out", str(tmp_path / name), "--zip"))
    assert ".csv" in message
    assert not any(tmp_path.iterdir())


def test_predict_refuses_paths_that_are_not_regular_files(run, tmp_path):
    _, _, done = run
    folder = tmp_path / "isdir.csv"
    folder.mkdir()
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    target = tmp_path / "target.csv"
    target.write_text("ID,Task2\n0,0.5\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    for path, said in ((folder, "not a regular file"), (fifo, "not a regular file"), (link, "symbolic link")):
        assert said in one_error_line(invoke("predict", "--run", str(done), "--out", str(path)))
    assert target.read_text() == "ID,Task2\n0,0.5\n" and link.is_symlink()


def test_predict_replaces_only_its_own_earlier_outputs(run, tmp_path):
    _, _, done = run
    out = tmp_path / "sub.csv"
    assert invoke("predict", "--run", str(done), "--out", str(out), "--zip").exit_code == 0
    first = sha256(out)
    assert invoke("predict", "--run", str(done), "--out", str(out), "--zip").exit_code == 0  # a re-run
    assert sha256(out) == first and zipfile.ZipFile(out.with_suffix(".zip")).namelist() == ["prediction.csv"]

    mine = tmp_path / "mine.csv"
    mine.write_text("user,score\n1,2\n")
    message = one_error_line(invoke("predict", "--run", str(done), "--out", str(mine)))
    assert "not a submission qin wrote" in message
    assert mine.read_text() == "user,score\n1,2\n"
    other = tmp_path / "other.csv"
    other.with_suffix(".json").write_text('{"my": "notes"}')
    assert "sidecar" in one_error_line(invoke("predict", "--run", str(done), "--out", str(other)))
    assert other.with_suffix(".json").read_text() == '{"my": "notes"}' and not other.exists()


def test_written_files_follow_the_umask(run, tmp_path):
    _, _, done = run
    previous = os.umask(0o022)
    try:
        out = tmp_path / "sub.csv"
        assert invoke("predict", "--run", str(done), "--out", str(out), "--zip").exit_code == 0
        for path in (out, out.with_suffix(".json"), out.with_suffix(".zip")):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(previous)
    for name in ("best.pt", "last.pt", "config.yaml", "result.json", DIGESTS):  # trained under `previous`
        assert (done / name).stat().st_mode & 0o777 == 0o666 & ~previous, name


# --------------------------------------------------------------------------------------------------
# Checkpoints you can trust


def test_flipped_bytes_inside_a_checkpoint_are_refused(run, tmp_path):
    _, _, done = run
    copy = tmp_path / "flip"
    shutil.copytree(done, copy)
    data = bytearray((copy / "best.pt").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    (copy / "best.pt").write_bytes(bytes(data))
    message = one_error_line(invoke("predict", "--run", str(copy), "--out", str(tmp_path / "s.csv")))
    assert "does not match the sha256" in message
    assert not (tmp_path / "s.csv").exists()
    assert "does not match" in one_error_line(invoke("evaluate", "--run", str(copy)))


def test_digests_record_the_files_on_disk(run):
    _, _, done = run
    recorded = json.loads((done / DIGESTS).read_text())["sha256"]
    assert recorded == {"best.pt": [sha256(done / "best.pt")], "last.pt": [sha256(done / "last.pt")]}


def test_a_checkpoint_that_would_run_code_is_never_unpickled(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "foreign"
    folder.mkdir()
    torch.save({"format": "qin-checkpoint-v1", "model_state": Payload()}, folder / "best.pt")
    with pytest.raises(QinError, match="never unpickles"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_last_pt_predicts_like_a_run(run, tmp_path):
    _, _, done = run
    out = tmp_path / "last.csv"
    result = invoke("predict", "--run", str(done / "last.pt"), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert pl.read_csv(out).columns == ["ID", "Task2"]


# --------------------------------------------------------------------------------------------------
# Kill and resume


def test_kill_9_then_resume_ends_at_the_same_weights(run, tmp_path):
    """A real `kill -9` of `qin train` after its first evaluation; --resume must finish bit-identical."""
    root, config, done = run
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "qin", "train", "-c", str(config), "--set", "train.epochs=3",
               "--set", "train.eval_steps=10", "--run-dir", str(killed), "--no-progress"]
    whole = tmp_path / "whole"
    assert subprocess.run([*command[:-3], "--run-dir", str(whole), "--no-progress"], env=env,
                          capture_output=True).returncode == 0
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "qin", "train", "--resume", str(killed), "--no-progress"],
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(whole / "best.pt"), load_checkpoint(killed / "best.pt")
    assert a["valid_auc"] == b["valid_auc"]
    for key, tensor in a["model_state"].items():
        assert torch.equal(tensor, b["model_state"][key]), key
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no evaluation logged twice


def test_resume_of_a_finished_run_trains_nothing_and_logs_nothing_twice(run):
    root, _, done = run
    results = root / "runs" / "results.jsonl"
    lines, metrics = results.read_text(), (done / "metrics.jsonl").read_text()
    result = invoke("train", "--resume", str(done), "--no-progress")
    assert result.exit_code == 0, result.output
    assert "already finished" in log_text(result.output)
    assert results.read_text() == lines and (done / "metrics.jsonl").read_text() == metrics


def test_a_damaged_feature_array_is_rebuilt_not_trusted(run):
    root, config, _ = run
    (feature_dir,) = [path for path in (root / "features").iterdir() if not path.name.startswith(".")]
    history = feature_dir / "valid" / "history.npy"
    intact = history.read_bytes()
    history.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(QinError, match="not a readable .npy array"):
        load_features(feature_dir).split("valid")
    result = invoke("preprocess", "-c", str(config))
    assert result.exit_code == 0 and "rebuilt" in result.output, result.output
    assert history.read_bytes() == intact


class Interrupt(Exception):
    pass


def interrupted_run(tiny_data, tiny_features, run_root: Path):
    cfg = tiny_config(tiny_data, run_root, epochs=3, patience=10, batch_size=2000, eval_steps=2)
    features = load_features(tiny_features)

    def stop(step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, features, run_root / "cut", progress=False, on_step=stop)
    return cfg, features, run_root / "cut"


def test_resume_skips_a_torn_metrics_line(tiny_data, tiny_features, tmp_path):
    cfg, features, cut = interrupted_run(tiny_data, tiny_features, tmp_path)
    with (cut / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "step": 6, "valid_au')  # killed mid-append
    result = fit(cfg, features, cut, resume=True, progress=False)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12] and result.steps == 12


def test_resume_refuses_changed_data_and_names_the_changed_key(tiny_data, tiny_features, tmp_path):
    cfg, features, cut = interrupted_run(tiny_data, tiny_features, tmp_path)
    sources = {**features.manifest["sources"], "train.parquet": {"sha256": "0" * 64}}
    changed = dataclasses.replace(features, manifest={**features.manifest, "sources": sources})
    with pytest.raises(QinError, match=r"raw data changed .*train\.parquet"):
        fit(cfg, changed, cut, resume=True, progress=False)
    with pytest.raises(QinError, match=r"train\.epochs \(3 -> 5\)"):
        fit(cfg.replace("train", epochs=5), features, cut, resume=True, progress=False)


# --------------------------------------------------------------------------------------------------
# Training guards


def test_a_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoints(tiny_data, tiny_features,
                                                                          tmp_path, monkeypatch):
    import qin.train.loop as train_module

    real_step = train_module.make_train_step

    def step_that_diverges_at_step_7(*args):
        step_fn = real_step(*args)
        calls = {"n": 0}

        def step(batch):
            calls["n"] += 1
            loss = step_fn(batch)
            return loss * float("nan") if calls["n"] >= 7 else loss

        return step

    monkeypatch.setattr(train_module, "make_train_step", step_that_diverges_at_step_7)
    cfg = tiny_config(tiny_data, tmp_path, epochs=3, batch_size=2000)  # 4 steps an epoch
    with pytest.raises(QinError, match=r"loss became nan at step 7 \(epoch 2\)"):
        fit(cfg, load_features(tiny_features), tmp_path / "run", progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["loop_state"]["global_step"] == 4  # the epoch-1 state, before the bad step
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == 4


def test_eval_steps_longer_than_the_run_still_gives_a_best_checkpoint(tiny_data, tiny_features, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=2, batch_size=2000, eval_steps=1000)  # 8 steps in all
    result = fit(cfg, load_features(tiny_features), tmp_path / "run", progress=False)
    assert [record["step"] for record in result.evaluations] == [8]
    assert (tmp_path / "run" / "best.pt").is_file()


def test_a_huge_finite_loss_counts_as_divergence():
    from qin.train import LoopState

    cfg = Config().train
    check_loss(0.7, LoopState(), cfg)
    with pytest.raises(QinError, match=r"5\.7e\+06 > train\.max_loss"):
        check_loss(5.7e6, LoopState(global_step=41), cfg)
    check_loss(5.7e6, LoopState(), cfg.model_copy(update={"max_loss": None}))
    with pytest.raises(QinError, match="became inf"):
        check_loss(float("inf"), LoopState(), cfg.model_copy(update={"max_loss": None}))


def test_a_one_class_validation_split_is_refused_before_training(tiny_data, tiny_features, tmp_path):
    copy = tmp_path / "features"
    shutil.copytree(tiny_features, copy)
    np.save(copy / "valid" / "label.npy", np.ones(np.load(copy / "valid" / "label.npy").shape, np.float32))
    cfg = tiny_config(tiny_data, tmp_path)
    with pytest.raises(QinError, match="valid: every one of the .* labels is 1"):
        fit(cfg, load_features(copy), tmp_path / "run", progress=False, on_step=lambda step: pytest.fail())


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(run, tmp_path):
    _, config, _ = run
    runs = tmp_path / "runs"
    message = one_error_line(invoke("train", "-c", str(config), "--set", f"train.run_root={runs}",
                                    "--set", "train.max_loss=1e-9", "--no-progress"))
    assert "at step 1 (epoch 1)" in message and "no checkpoint was saved" in message
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------------------------------
# Config values that would only fail later


@pytest.mark.parametrize("override, said", [
    ("train.learning_rate=nan", "finite"), ("train.learning_rate=inf", "finite"),
    ("train.learning_rate=0", "> 0"), ("train.threads=0", "train.threads"),
    ("train.min_delta=-1", "train.min_delta"), ("train.max_loss=0", "train.max_loss"),
    ("model.net_dropout=nan", "finite"),
])
def test_bad_config_values_fail_at_load_naming_the_key(run, override, said):
    _, config, _ = run
    message = one_error_line(invoke("preprocess", "-c", str(config), "--set", override))
    assert said in message


def test_a_numeric_looking_path_stays_a_path():
    cfg = Config.from_yaml(ROOT / "configs" / "demo.yaml", ["data.raw_dir=2024", "train.run_root=007"])
    assert cfg.data.raw_dir == "2024" and cfg.train.run_root == "007"


# --------------------------------------------------------------------------------------------------
# Choices, paths and the disk


@pytest.mark.parametrize("args", [
    ["predict", "--device", "gpu"], ["predict", "--split", "train"], ["predict", "--column", "Task3"],
    ["demo", "--size", "bogus"], ["embed", "--fusion", "sum"], ["embed", "--from", "foo"],
    ["synth", "--size", "huge"], ["synth", "--process", "other"],
])
def test_a_bad_choice_is_a_usage_error_listing_the_choices(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Invalid value" in result.output and result.exception is not None
    assert not isinstance(result.exception, ValueError)


def test_a_file_where_a_folder_should_be_is_one_line(run, tmp_path):
    _, config, done = run
    afile = tmp_path / "afile"
    afile.write_text("x")
    message = one_error_line(invoke("train", "-c", str(config), "--set", f"train.run_root={afile}",
                                    "--no-progress"))
    assert str(afile) in message
    message = one_error_line(invoke("predict", "--run", str(done), "--out", str(afile / "s.csv")))
    assert str(afile) in message and "is a file, not a folder" in message
    assert afile.read_text() == "x"


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_leaves_no_temp(run, tmp_path, monkeypatch):
    import qin.files as files_module

    _, config, _ = run
    real_fsync = os.fsync

    def fsync_full_after_config(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "config.yaml" not in os.readlink(
                f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files_module.os, "fsync", fsync_full_after_config)
    run_dir = tmp_path / "full"
    message = one_error_line(invoke("train", "-c", str(config), "--run-dir", str(run_dir), "--no-progress"))
    assert "no space left on the device" in message and f"{run_dir}/" in message and ".tmp" not in message
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_a_write_error_without_errno_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import shutil as shutil_module

    from qin.errors import os_error

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=0))
    message = str(os_error(OSError(None, None), doing="writing x", path=tmp_path / "a.npy"))
    assert message == f"{tmp_path / 'a.npy'}: no space left on the device (writing x)"


def test_resume_needs_no_config_in_the_current_folder(run, tmp_path, monkeypatch):
    _, _, done = run
    monkeypatch.chdir(tmp_path)  # no qin.yaml here, and relative paths would point elsewhere
    result = invoke("train", "--resume", str(done), "--no-progress")
    assert result.exit_code == 0 and "already finished" in log_text(result.output), result.output
    assert not (tmp_path / "features").exists()


def test_evaluate_refuses_the_truth_of_another_data_set(run, tmp_path):
    root, _, done = run
    other = tmp_path / "other"
    assert invoke("synth", "--size", "tiny", "--seed", "1", "--out", str(other), "--no-images").exit_code == 0
    message = one_error_line(invoke("evaluate", "--run", str(done), "--truth", str(other / "hidden")))
    assert "does not belong" in message
    result = invoke("evaluate", "--run", str(done), "--truth", str(root / "data" / "hidden"))
    assert result.exit_code == 0, result.output


def test_neighbors_names_a_broken_table(tmp_path, tiny_data):
    table = tmp_path / "item_info.parquet"
    info = pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "item_info.parquet")
    info.write_parquet(table)
    table.write_bytes(table.read_bytes()[:-100])
    assert str(table) in one_error_line(invoke("neighbors", "--table", str(table), "3"))
    vectors = info["item_emb_d128"].to_list()
    vectors[5] = [float("nan")] * len(vectors[5])
    info.with_columns(pl.Series("item_emb_d128", vectors)).write_parquet(table)
    assert "first bad row 5" in one_error_line(invoke("neighbors", "--table", str(table), "3"))


# --------------------------------------------------------------------------------------------------
# The second battery: concurrency, strict ownership, early checks


def test_two_trainings_in_one_run_folder_are_refused(run, tmp_path):
    from qin.runs import LOCK, RunLock

    _, config, _ = run
    busy = tmp_path / "busy"
    lock = RunLock(busy)
    assert lock.acquire() is True
    try:
        message = one_error_line(invoke("train", "-c", str(config), "--run-dir", str(busy), "--no-progress"))
        assert f"(pid {os.getpid()})" in message and "another `qin train`" in message
    finally:
        lock.release()
    result = invoke("train", "-c", str(config), "--set", "train.epochs=1", "--run-dir", str(busy),
                    "--no-progress")
    assert result.exit_code == 0, result.output  # free again once the holder is gone
    assert (busy / LOCK).is_file() and (busy / "best.pt").is_file()


def test_the_default_run_is_the_newest_finished_one(run, tmp_path, monkeypatch):
    root, _, done = run
    unfinished = root / "runs" / "zz-still-training"
    unfinished.mkdir()
    shutil.copy(done / "best.pt", unfinished / "best.pt")  # newer, but no result.json
    monkeypatch.chdir(root)
    result = invoke("predict", "--out", str(tmp_path / "s.csv"))
    assert result.exit_code == 0, result.output
    assert "run: runs/zz-still-training" not in result.output and "newest finished run" in result.output
    shutil.rmtree(unfinished)


def test_a_csv_that_merely_starts_with_id_is_not_a_submission(run, tmp_path):
    _, _, done = run
    mine = tmp_path / "labels.csv"
    mine.write_text("ID,label,comment\n0,1,keep me\n")
    message = one_error_line(invoke("predict", "--run", str(done), "--out", str(mine)))
    assert "not a submission qin wrote" in message
    assert mine.read_text() == "ID,label,comment\n0,1,keep me\n"


def test_run_files_that_are_not_checkpoints_are_named_as_such(run):
    _, _, done = run
    message = one_error_line(invoke("predict", "--run", str(done / "config.yaml")))
    assert "not one of this run's checkpoints" in message
    message = one_error_line(invoke("train", "--resume", str(done / "best.pt")))
    assert f"--resume {done}" in message


def test_predict_warns_when_the_features_come_from_other_raw_files(run, tmp_path):
    root, config, done = run
    other = tmp_path / "other"
    assert invoke("synth", "--size", "tiny", "--seed", "1", "--out", str(other), "--no-images").exit_code == 0
    built = invoke("preprocess", "-c", str(config), "--set", f"data.raw_dir={other / 'MicroLens_1M_x1'}",
                   "--set", f"data.features_root={tmp_path / 'features'}")
    assert built.exit_code == 0, built.output
    (feature_dir,) = (tmp_path / "features").iterdir()
    result = invoke("predict", "--run", str(done), "--features", str(feature_dir), "--out",
                    str(tmp_path / "s.csv"))
    assert result.exit_code == 0 and "warning:" in result.output and "other raw files" in result.output


def test_options_a_command_would_ignore_are_refused(tmp_path, tiny_data):
    message = one_error_line(invoke("embed", "--from", "precomputed", "--data", str(tiny_data), "--fusion",
                                    "mean", "--out", str(tmp_path / "t.parquet")))
    assert "--fusion" in message and not (tmp_path / "t.parquet").exists()
    table = tiny_data / "MicroLens_1M_x1" / "item_info.parquet"
    message = one_error_line(invoke("neighbors", "--table", str(table), "--data", str(tmp_path), "3"))
    assert "item_feature.parquet" in message


@pytest.mark.parametrize("override, said", [
    ("train.min_lr=0.5", "must not exceed train.learning_rate"),
    ("train.seed=100000000000000000000", "64 bits"),
    ("model.mlp_hidden=[]", "at least one width"),
    ("train.epochs=abc", "--set: train.epochs must be int"),
])
def test_more_config_values_fail_at_load(run, override, said):
    _, config, _ = run
    assert said in one_error_line(invoke("preprocess", "-c", str(config), "--set", override))


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-3\n  learning_rate: 5.0\n")
    with pytest.raises(QinError, match="line 3, column 3: key 'learning_rate' given a second time"):
        Config.from_yaml(path)


def test_a_results_log_that_is_not_a_file_is_refused_before_training(run, tmp_path):
    _, config, _ = run
    (tmp_path / "results.jsonl").mkdir()
    message = one_error_line(invoke("train", "-c", str(config), "--set", f"train.run_root={tmp_path}",
                                    "--no-progress"))
    assert "results.jsonl: exists and is not a regular file" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no run folder left


def test_resume_after_the_raw_data_changed_is_refused_before_any_rebuild(tmp_path):
    data = tmp_path / "data"
    assert invoke("synth", "--size", "tiny", "--out", str(data), "--no-images").exit_code == 0
    raw = data / "MicroLens_1M_x1"
    sets = ["--set", f"data.raw_dir={raw}", "--set", f"data.features_root={tmp_path / 'features'}",
            "--set", "data.max_len=8", "--set", "model.embedding_dim=4", "--set", "model.num_layers=1",
            "--set", "train.epochs=1", "--set", "train.batch_size=2048"]
    run_dir = tmp_path / "run"
    assert invoke("train", "-c", str(ROOT / "qin.yaml"), *sets, "--run-dir", str(run_dir),
                  "--no-progress").exit_code == 0
    (feature_dir,) = (tmp_path / "features").iterdir()
    manifest = (feature_dir / "manifest.json").read_bytes()
    valid = pl.read_parquet(raw / "valid.parquet")
    valid.with_columns(pl.col("label").reverse()).write_parquet(raw / "valid.parquet")
    message = one_error_line(invoke("train", "--resume", str(run_dir), "--no-progress"))
    assert "raw data changed since the run started (valid.parquet differs" in message
    assert (feature_dir / "manifest.json").read_bytes() == manifest


def test_a_users_own_submission_is_never_replaced(run, tmp_path):
    """The header cannot tell a user's ID,Task2 file from qin's; the sidecar's sha256 can."""
    _, _, done = run
    mine = tmp_path / "other_model.csv"
    mine.write_text("ID,Task2\n0,0.5\n1,0.25\n")
    assert "not a submission qin wrote" in one_error_line(invoke("predict", "--run", str(done), "--out",
                                                                 str(mine)))
    assert mine.read_text() == "ID,Task2\n0,0.5\n1,0.25\n"
    ours = tmp_path / "ours.csv"
    assert invoke("predict", "--run", str(done), "--out", str(ours), "--zip").exit_code == 0
    recorded = json.loads(ours.with_suffix(".json").read_text())["sha256"]
    assert recorded == {"submission": sha256(ours), "zip": sha256(ours.with_suffix(".zip"))}
    ours.write_text("ID,Task2\n0,0.9\n")  # the user edited qin's file by hand: now it is theirs
    assert "not a submission qin wrote" in one_error_line(invoke("predict", "--run", str(done), "--out",
                                                                 str(ours)))
    assert ours.read_text() == "ID,Task2\n0,0.9\n"


@pytest.mark.parametrize("content, said", [
    ("train: 5\n", "section 'train' must be a mapping of keys, got 5"),
    ("base: [a.yaml]\n", "base: must name one YAML file"),
])
def test_config_file_problems_are_blamed_on_the_file(tmp_path, content, said):
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(QinError, match=re.escape(said)) as caught:
        Config.from_yaml(path, ["train.epochs=2"])
    assert str(caught.value).startswith(str(path))
    with pytest.raises(QinError, match="is a folder or a device, not a YAML config file"):
        Config.from_yaml(tmp_path)
    with pytest.raises(QinError, match="^--set: unknown config key"):
        Config.from_yaml(ROOT / "qin.yaml", ["train.foo=1"])


def test_checkpoint_digests_cannot_be_bypassed(run, tmp_path):
    _, _, done = run
    for damage in ("delete", "empty", "folder"):
        copy = tmp_path / damage
        shutil.copytree(done, copy)
        digests = copy / DIGESTS
        digests.unlink()
        if damage == "empty":
            digests.write_text(json.dumps({"format": "qin-checkpoint-digests-v1", "sha256": {}}))
        elif damage == "folder":
            digests.mkdir()
        message = one_error_line(invoke("predict", "--run", str(copy), "--out", str(tmp_path / "s.csv")))
        assert "cannot be verified" in message or "not a regular file" in message, damage
    assert not (tmp_path / "s.csv").exists()


def test_a_run_killed_during_its_first_checkpoint_can_be_overwritten(run, tmp_path):
    _, config, done = run
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    shutil.copy(done / "config.yaml", stuck / "config.yaml")
    shutil.copy(done / DIGESTS, stuck / DIGESTS)
    (stuck / ".best.pt.99999999.abcd.tmp").write_bytes(b"half a checkpoint")
    assert "--overwrite" in one_error_line(invoke("train", "--resume", str(stuck)))
    result = invoke("train", "-c", str(config), "--set", "train.epochs=1", "--run-dir", str(stuck),
                    "--overwrite", "--no-progress")
    assert result.exit_code == 0, result.output
    assert not list(stuck.glob(".*.tmp"))


def test_resume_names_what_is_wrong_with_the_folder(tmp_path):
    assert "no such run folder" in one_error_line(invoke("train", "--resume", str(tmp_path / "nope")))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert "not a qin run folder" in one_error_line(invoke("train", "--resume", str(tmp_path / "mine")))


def test_truth_without_its_meta_is_refused(run, tmp_path):
    root, _, done = run
    truth = tmp_path / "hidden"
    shutil.copytree(root / "data" / "hidden", truth)
    (truth / "meta.json").unlink()
    message = one_error_line(invoke("evaluate", "--run", str(done), "--truth", str(truth)))
    assert "cannot be checked" in message
    (truth / "valid_truth.parquet").write_bytes(b"garbage")
    assert "valid_truth.parquet" in one_error_line(invoke("evaluate", "--run", str(done), "--truth",
                                                          str(truth)))


def test_altered_labels_are_refused_before_training(tiny_data, tiny_features, tmp_path):
    copy = tmp_path / "features"
    shutil.copytree(tiny_features, copy)
    labels = np.load(copy / "train" / "label.npy")
    labels[3] = 7.0
    np.save(copy / "train" / "label.npy", labels)
    with pytest.raises(QinError, match="row 3 holds label 7.0"):
        fit(tiny_config(tiny_data, tmp_path), load_features(copy), tmp_path / "run", progress=False)


def test_a_metrics_line_that_is_not_an_object_is_named(tmp_path):
    from qin.files import read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n42\n{"step": 2}\n')
    with pytest.raises(QinError, match="line 2 is int '42', not a JSON object"):
        read_jsonl(path)


def test_fourth_battery_cases(run, tmp_path, monkeypatch):
    """Test truth of another data set, a bad middle metrics line, a resume without last.pt but with best.pt,
    an unknown section from --set, and image options without an image model."""
    root, config, done = run
    other = tmp_path / "other"
    assert invoke("synth", "--size", "tiny", "--seed", "2", "--out", str(other), "--no-images").exit_code == 0
    message = one_error_line(invoke("evaluate", "--run", str(done), "--split", "test", "--truth",
                                    str(other / "hidden")))
    assert "belongs to another data set" in message
    assert invoke("evaluate", "--run", str(done), "--split", "test", "--truth",
                  str(root / "data" / "hidden")).exit_code == 0

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\ngarbage line')
    with pytest.raises(QinError, match="line 2 is not valid JSON"):
        from qin.files import read_jsonl

        read_jsonl(metrics)

    copy = tmp_path / "no_last"
    shutil.copytree(done, copy)
    (copy / "last.pt").unlink()
    message = one_error_line(invoke("train", "--resume", str(copy)))
    assert "best.pt is still there" in message and "--overwrite would delete it" in message

    with pytest.raises(QinError, match="^--set: unknown config section"):
        Config.from_yaml(ROOT / "qin.yaml", ["nosuch.key=1"])

    data = root / "data"
    message = one_error_line(invoke("embed", "--from", "content", "--data", str(data),
                                    "--image-weight", "0.9",
                                    "--out", str(tmp_path / "t.parquet")))
    assert "--image-weight would be ignored" in message


def test_a_config_from_an_older_qin_still_resumes():
    from qin.train import resume_differences

    current = Config().to_dict()
    older = {section: dict(values) for section, values in current.items()}
    del older["model"]["cross_layers"], older["model"]["transformer_mask"], older["model"]["cross_rank"]
    assert resume_differences(older, current) == ""


def test_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    from qin.packaged import config_path

    monkeypatch.chdir(tmp_path)
    assert config_path(Path("qin.yaml")).read_text() == (ROOT / "qin.yaml").read_text()
    assert config_path(Path("configs/demo.yaml")).is_file()
    assert config_path(Path("nope.yaml")) == Path("nope.yaml")


def test_synth_onto_a_mount_point_is_refused_before_any_work(tmp_path):
    mount_point = tmp_path / "volume"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        message = one_error_line(invoke("synth", "--size", "tiny", "--no-images", "--out", str(mount_point)))
        assert "is a mount point" in message and f"--out {mount_point / 'data'}" in message
        assert not any(mount_point.iterdir()) and not list(tmp_path.glob(".volume.tmp-*"))
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
