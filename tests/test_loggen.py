"""Tests of the log-like generator (qin.loggen), tiny size: layout, determinism, truth, safety, CLI."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from qin.cli import app
from qin.errors import QinError
from qin.features.pipeline import build_features
from qin.layout import TEMP_MARKER
from qin.loggen import DEFAULT_LOG_PARAMS, LOG_SIZES, LogSize, generate_logs, log_params_with
from qin.synth import SynthSize, expected_auc, synthesize

TINY = LOG_SIZES[LogSize.tiny]
FILES = ["MicroLens_1M_x1/train.parquet", "MicroLens_1M_x1/valid.parquet", "MicroLens_1M_x1/test.parquet",
         "MicroLens_1M_x1/item_info.parquet", "hidden/valid_truth.parquet", "hidden/test_truth.parquet"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("loggen") / "data"
    generate_logs(out, LogSize.tiny, seed=0)
    return out


def _meta(folder: Path) -> dict:
    return json.loads((folder / "hidden" / "meta.json").read_text())


def _frames(folder: Path) -> dict[str, pl.DataFrame]:
    return {name: pl.read_parquet(folder / name) for name in FILES}


def _seq(folder: Path, split: str) -> np.ndarray:
    t = pq.read_table(folder / "MicroLens_1M_x1" / f"{split}.parquet", columns=["item_seq"])
    return np.asarray(t["item_seq"].combine_chunks().values).reshape(-1, TINY.seq_len)  # (n, S)


def test_schema_matches_qin_synth(tiny: Path, tiny_data: Path) -> None:
    for name in FILES:
        ours, theirs = pq.read_schema(tiny / name), pq.read_schema(tiny_data / name)
        assert [(f.name, f.type) for f in ours] == [(f.name, f.type) for f in theirs], name
    # meta.json carries every key of qin synth's meta that applies to it (and the same auc keys).
    ours, theirs = _meta(tiny), _meta(tiny_data)
    inapplicable = {"n_empty_titles", "n_missing_images"}
    assert set(theirs) - inapplicable <= set(ours)
    assert {"oracle_valid", "oracle_test", "expected_oracle_valid", "expected_oracle_test",
            "popularity_valid", "popularity_test"} <= set(ours["auc"])
    assert ours["generator"] == "loggen" and ours["params"]["w_match"] == DEFAULT_LOG_PARAMS.w_match


def test_rows_ids_and_padding(tiny: Path) -> None:
    frames = _frames(tiny)
    train, valid, test = (frames[f"MicroLens_1M_x1/{s}.parquet"] for s in ("train", "valid", "test"))
    assert (train.height, valid.height, test.height) == (TINY.train_rows, TINY.valid_rows, TINY.test_rows)
    assert test.columns[0] == "ID" and test["ID"].to_list() == list(range(TINY.test_rows))
    users = [set(f["user_id"].to_list()) for f in (train, valid, test)]
    assert not users[0] & users[1] and not users[0] & users[2] and not users[1] & users[2]
    for split in ("train", "valid", "test"):
        seq = _seq(tiny, split)
        nonzero = seq > 0
        assert nonzero[:, -1].all(), "every row has a history, most recent item last"
        assert (np.diff(nonzero.astype(np.int8), axis=1) >= 0).all(), "zeros only on the left"
    lengths = (_seq(tiny, "train") > 0).sum(axis=1)
    assert 3 <= np.median(lengths) <= 5 and (lengths <= 2).mean() > 0.2 and lengths.max() > 10
    info = frames["MicroLens_1M_x1/item_info.parquet"]
    assert info["item_id"].to_list() == list(range(TINY.n_items + 1))
    emb = np.asarray(info["item_emb_d128"].to_list())  # (N+1, 128)
    tags = np.asarray(info["item_tags"].to_list())  # (N+1, 5)
    assert emb.shape == (TINY.n_items + 1, 128) and (emb[0] == 0).all() and (tags[0] == 0).all()
    assert 1.5 < emb[1:, 0].std() < 5 and emb[1:, -1].std() < emb[1:, 0].std() / 3, "PCA-like scale"
    assert (tags[1:, 0] > 0).all() and tags.max() <= TINY.n_tags
    for col in ("likes_level", "views_level"):
        assert train[col].min() >= 0 and train[col].max() <= 9


def test_same_seed_same_data_other_seed_other_data(tiny: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    generate_logs(again, LogSize.tiny, seed=0)
    generate_logs(other, LogSize.tiny, seed=1)
    first, second, third = _frames(tiny), _frames(again), _frames(other)
    for name in FILES:
        assert first[name].equals(second[name]), name
    assert not first["MicroLens_1M_x1/train.parquet"].equals(third["MicroLens_1M_x1/train.parquet"])
    assert not first["MicroLens_1M_x1/item_info.parquet"].equals(third["MicroLens_1M_x1/item_info.parquet"])


def test_oracle_in_meta_matches_the_truth_files(tiny: Path) -> None:
    meta = _meta(tiny)
    p_valid = pl.read_parquet(tiny / "hidden" / "valid_truth.parquet")
    y_valid = pl.read_parquet(tiny / "MicroLens_1M_x1" / "valid.parquet")["label"].to_numpy()
    assert p_valid["row"].to_list() == list(range(y_valid.size))
    assert meta["auc"]["oracle_valid"] == pytest.approx(roc_auc_score(y_valid, p_valid["p_true"]), abs=1e-12)
    assert meta["auc"]["expected_oracle_valid"] == pytest.approx(expected_auc(p_valid["p_true"].to_numpy()))
    test_truth = pl.read_parquet(tiny / "hidden" / "test_truth.parquet")
    oracle_test = roc_auc_score(test_truth["label"], test_truth["p_true"])
    assert meta["auc"]["oracle_test"] == pytest.approx(oracle_test)
    eps = DEFAULT_LOG_PARAMS.label_eps
    assert p_valid["p_true"].min() >= eps / 2 and p_valid["p_true"].max() <= 1 - eps / 2
    assert 0.7 < meta["auc"]["expected_oracle_valid"] < 0.95


def test_label_mean_and_cold_items(tiny: Path) -> None:
    meta = _meta(tiny)
    train = pl.read_parquet(tiny / "MicroLens_1M_x1" / "train.parquet")
    assert 0.2 <= train["label"].mean() <= 0.3 and 0.2 <= meta["label_mean"] <= 0.3
    seen = set(train["item_id"].to_list()) | set(_seq(tiny, "train").ravel().tolist())
    for split in ("valid", "test"):
        targets = set(pl.read_parquet(tiny / "MicroLens_1M_x1" / f"{split}.parquet")["item_id"].to_list())
        assert len(targets - seen) >= 5, f"{split} has targets that never appear in train"
    assert meta["cold"]["items"] > 0


def test_features_pipeline_accepts_the_output(tiny: Path, tmp_path: Path) -> None:
    result = build_features(tiny / "MicroLens_1M_x1", tmp_path / "features", max_len=16, progress=False)
    assert result.rebuilt and result.feature_dir.is_dir()


def test_refuses_foreign_folders_and_replaces_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "real"
    (foreign / "MicroLens_1M_x1").mkdir(parents=True)
    (foreign / "MicroLens_1M_x1" / "train.parquet").write_bytes(b"real data")
    with pytest.raises(QinError, match=str(foreign)):
        generate_logs(foreign, LogSize.tiny)
    assert (foreign / "MicroLens_1M_x1" / "train.parquet").read_bytes() == b"real data"
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(QinError, match="notes.txt"):
        generate_logs(stray, LogSize.tiny)
    ours = tmp_path / "ours"
    generate_logs(ours, LogSize.tiny, seed=0)
    generate_logs(ours, LogSize.tiny, seed=1)  # an earlier loggen output is replaced
    assert _meta(ours)["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "real", "stray"], "no temp folder left"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (relative) with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def test_cli_refuses_a_folder_of_real_raw_files(tmp_path: Path) -> None:
    """Regression: the organisers' item_feature.parquet and item_images/ must never be replaced."""
    out = tmp_path / "raw"
    (out / "item_images").mkdir(parents=True)
    (out / "item_images" / "1.jpg").write_bytes(b"\xff\xd8 a real cover")
    (out / "item_feature.parquet").write_bytes(b"PAR1 the organisers' item features")
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert str(out) in message and "item_feature.parquet, item_images" in message
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"], "no temp folder left"


def test_cli_refuses_files_the_user_added_inside_outputs_and_keeps_them(tmp_path: Path) -> None:
    out = tmp_path / "s1"
    generate_logs(out, LogSize.tiny, seed=1)
    assert _meta(out)["file_list"] == "hidden/files.txt"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert (out / "hidden" / "files.txt").read_text().splitlines() == written
    (out / "MicroLens_1M_x1" / "extra.parquet").write_bytes(b"PAR1 my own split")
    (out / "hidden" / "mine").mkdir()
    (out / "hidden" / "mine" / "keep.txt").write_text("my notes")
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--seed", "1",
                                      "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    added = "MicroLens_1M_x1/extra.parquet, hidden/mine/keep.txt"
    assert f"{out} holds files `qin synth` did not write: {added};" in message
    assert "move them out first" in message and "Traceback" not in result.output
    assert _snapshot(out) == before, "every file byte-identical"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"], "no temp folder left"
    # The demo generator's folder is guarded the same way, item_images/ included.
    demo = tmp_path / "demo"
    synthesize(demo, SynthSize.tiny, seed=0, images=True, progress=False)
    (demo / "item_images" / "real_cover.jpg").write_bytes(b"\xff\xd8 mine")
    before = _snapshot(demo)
    with pytest.raises(QinError, match="did not write: item_images/real_cover.jpg;"):
        generate_logs(demo, LogSize.tiny)
    assert _snapshot(demo) == before
    # Once they are moved out, a re-run works; an old marker without a file list is checked by entry.
    (out / "MicroLens_1M_x1" / "extra.parquet").unlink()
    shutil.rmtree(out / "hidden" / "mine")
    generate_logs(out, LogSize.tiny, seed=2)
    meta = _meta(out)
    (out / "hidden" / "files.txt").unlink()
    (out / "hidden" / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "file_list"}))
    generate_logs(out, LogSize.tiny, seed=3)
    assert _meta(out)["seed"] == 3 and (out / "hidden" / "files.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "s1"]


def test_each_generator_replaces_the_others_output(tmp_path: Path) -> None:
    out = tmp_path / "data"
    synthesize(out, SynthSize.tiny, seed=0, images=True, progress=False)
    (out / "notes.txt").write_text("mine")
    generate_logs(out, LogSize.tiny, seed=0)
    # The demo generator's item_*.parquet and item_images/ go too: left there, nothing would vouch for them.
    assert sorted(p.name for p in out.iterdir()) == ["MicroLens_1M_x1", "hidden", "notes.txt"]
    assert _meta(out)["outputs"] == ["MicroLens_1M_x1", "hidden"]
    synthesize(out, SynthSize.tiny, seed=0, images=False, progress=False)
    assert _meta(out)["generator"] == "qin.synth" and (out / "item_feature.parquet").is_file()
    generate_logs(out, LogSize.tiny, seed=1)
    assert _meta(out)["generator"] == "loggen" and _meta(out)["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], "no temp folder left"


def test_stale_temp_folders_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above Linux's largest pid_max: never a live process
    stale = tmp_path / f".data.tmp-{dead_pid}-k1ll3d_9"
    running = tmp_path / f".data.tmp-{os.getppid()}-l1v3_123"
    look_alike = tmp_path / f".data.tmp-{dead_pid}-n0_marker"  # a user's folder: no proof qin made it
    for folder in (stale, running, look_alike):
        (folder / "hidden").mkdir(parents=True)
    for folder in (stale, running):
        (folder / TEMP_MARKER).write_text(folder.name.split("-")[1])  # as make_temp_dir writes it
    (look_alike / "notes.txt").write_text("mine")
    generate_logs(tmp_path / "data", LogSize.tiny)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, look_alike.name, "data"])
    assert (look_alike / "notes.txt").read_text() == "mine"


def test_a_quoted_tilde_means_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    generate_logs(Path("~/x"), LogSize.tiny)
    assert (home / "x" / "MicroLens_1M_x1" / "item_info.parquet").is_file()
    result = CliRunner().invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--seed", "1",
                                      "--out", "~/x"])
    assert result.exit_code == 0, result.output
    assert _meta(home / "x")["seed"] == 1
    assert sorted(p.name for p in home.iterdir()) == ["x"], "no temp folder left"
    assert list(cwd.iterdir()) == [], "nothing named ~ in the current folder"


def test_os_errors_are_one_line_errors_and_leave_no_temp_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(path: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("qin.loggen.generate.write_split", no_space)
    out = tmp_path / "data"
    with pytest.raises(QinError, match=r"train.parquet: no space left on the device \(writing the synth"):
        generate_logs(out, LogSize.tiny)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--out", str(out)])
    assert result.exit_code == 2 and "no space left" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_an_os_error_without_a_file_name_names_the_output_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space_unnamed(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qin.loggen.generate.write_split", no_space_unnamed)
    out = tmp_path / "data"
    with pytest.raises(QinError, match=f"^{out}: no space left on the device"):
        generate_logs(out, LogSize.tiny)
    result = CliRunner().invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--out", str(out)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{out}: no space left" in message and "path unknown" not in message
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(QinError, match="size"):
        generate_logs(tmp_path / "x", "full")  # type: ignore[arg-type]
    with pytest.raises(QinError, match="seed"):
        generate_logs(tmp_path / "x", LogSize.tiny, seed=-1)
    with pytest.raises(QinError, match="no_such_knob"):
        log_params_with(["no_such_knob=1"])
    with pytest.raises(QinError, match="w_match"):
        log_params_with(["w_match=high"])
    assert log_params_with(["w_match=2.5", "sir_proposals=8"]).sir_proposals == 8
    assert not (tmp_path / "x").exists()


def test_cli_synth_process_logs(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "logs"
    result = runner.invoke(app, ["synth", "--process", "logs", "--size", "tiny", "--out", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "oracle AUC (valid)" in result.output and "popularity alone" in result.output
    assert _meta(out)["generator"] == "loggen"
    full = runner.invoke(app, ["synth", "--process", "logs", "--size", "full", "--out", str(tmp_path / "f")])
    assert full.exit_code == 2 and "tiny, small, bench" in full.output
