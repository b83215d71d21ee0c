"""Tests of the demo data generator (qin.synth) on the `tiny` size: schema, determinism, truth and metrics."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from qin.cli import app
from qin.errors import QinError
from qin.layout import TEMP_MARKER, process_alive
from qin.synth import (
    DEFAULT_PARAMS,
    SIZES,
    SynthResult,
    SynthSize,
    draw_synth,
    expected_auc,
    params_with,
    synthesize,
)

TINY = SIZES[SynthSize.tiny]
S = TINY.seq_len
I64, F64, F32 = pa.int64(), pa.float64(), pa.float32()
ROW_SCHEMA = [("user_id", I64), ("item_seq", pa.list_(I64)), ("item_id", I64), ("likes_level", I64),
              ("views_level", I64)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return synthesize(tmp_path_factory.mktemp("synth") / "data", SynthSize.tiny, seed=0, progress=False)


def _schema(path: Path) -> list[tuple[str, pa.DataType]]:
    return [(f.name, f.type) for f in pq.read_schema(path)]


def _list_lengths(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.combine_chunks().value_lengths())


def test_file_layout(tiny: SynthResult) -> None:
    d = tiny.data_dir
    for rel in ["MicroLens_1M_x1/train.parquet", "MicroLens_1M_x1/valid.parquet",
                "MicroLens_1M_x1/test.parquet", "MicroLens_1M_x1/item_info.parquet", "item_feature.parquet",
                "item_emb.parquet", "item_seq.parquet", "hidden/valid_truth.parquet",
                "hidden/test_truth.parquet", "hidden/meta.json"]:
        assert (d / rel).is_file(), rel
    assert tiny.hidden_dir == d / "hidden"
    # Nothing temporary is left next to the output.
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".data.tmp-")]


@pytest.mark.parametrize("split, rows", [("train", TINY.train_rows), ("valid", TINY.valid_rows)])
def test_train_valid_schema(tiny: SynthResult, split: str, rows: int) -> None:
    path = tiny.data_dir / "MicroLens_1M_x1" / f"{split}.parquet"
    assert _schema(path) == ROW_SCHEMA + [("label", F64)]
    t = pq.read_table(path)
    assert t.num_rows == rows
    assert (_list_lengths(t["item_seq"]) == S).all()
    label = t["label"].to_numpy()
    assert set(np.unique(label)) <= {0.0, 1.0}
    for col in ("likes_level", "views_level"):
        v = t[col].to_numpy()
        assert v.min() >= 0 and v.max() <= 9
    items = t["item_id"].to_numpy()
    assert items.min() >= 1 and items.max() <= TINY.n_items
    assert t["user_id"].to_numpy().min() >= 1


def test_item_seq_left_padded(tiny: SynthResult) -> None:
    t = pq.read_table(tiny.data_dir / "MicroLens_1M_x1" / "train.parquet", columns=["item_seq"])
    seq = np.asarray(t["item_seq"].combine_chunks().values).reshape(-1, S)  # (n, S)
    nonzero = seq > 0
    assert nonzero.any(axis=1).all(), "every row has at least one history item"
    assert nonzero[:, -1].all(), "most recent item is last"
    # Once a slot is non-zero, every later slot is too (zeros only on the left).
    assert (np.diff(nonzero.astype(np.int8), axis=1) >= 0).all()
    assert seq.max() <= TINY.n_items


def test_test_split_has_id_and_no_label(tiny: SynthResult) -> None:
    path = tiny.data_dir / "MicroLens_1M_x1" / "test.parquet"
    assert _schema(path) == [("ID", I64)] + ROW_SCHEMA
    ids = pq.read_table(path, columns=["ID"])["ID"].to_numpy()
    np.testing.assert_array_equal(ids, np.arange(TINY.test_rows))


def test_splits_have_disjoint_users(tiny: SynthResult) -> None:
    d = tiny.data_dir / "MicroLens_1M_x1"
    users = [set(pq.read_table(d / f"{s}.parquet", columns=["user_id"])["user_id"].to_pylist())
             for s in ("train", "valid", "test")]
    assert not users[0] & users[1] and not users[0] & users[2] and not users[1] & users[2]
    # About 4 rows per user.
    assert 3.5 <= TINY.train_rows / len(users[0]) <= 4.0


def test_item_info(tiny: SynthResult) -> None:
    path = tiny.data_dir / "MicroLens_1M_x1" / "item_info.parquet"
    assert _schema(path) == [("item_id", I64), ("item_tags", pa.list_(I64)), ("item_emb_d128", pa.list_(F64))]
    t = pq.read_table(path)
    n = TINY.n_items
    np.testing.assert_array_equal(t["item_id"].to_numpy(), np.arange(n + 1))
    assert (_list_lengths(t["item_tags"]) == 5).all() and (_list_lengths(t["item_emb_d128"]) == 128).all()
    tags = np.asarray(t["item_tags"].combine_chunks().values).reshape(n + 1, 5)
    emb = np.asarray(t["item_emb_d128"].combine_chunks().values).reshape(n + 1, 128)
    assert (tags[0] == 0).all() and (emb[0] == 0).all()
    assert (tags[1:, 0] > 0).all(), "every item has at least one tag"
    # Zero padding on the right only, and tag ids within the vocabulary.
    assert (np.diff((tags[1:] > 0).astype(np.int8), axis=1) <= 0).all()
    assert tags.max() <= TINY.n_tags
    assert np.abs(emb[1:]).sum(axis=1).min() > 0


def test_item_feature_matches_item_info(tiny: SynthResult) -> None:
    path = tiny.data_dir / "item_feature.parquet"
    assert _schema(path) == [("item_id", I64), ("item_title", pa.string()), ("item_tags", pa.list_(I64)),
                             ("likes_level", I64), ("views_level", I64), ("txt_emb_BERT", pa.list_(F32)),
                             ("img_emb_CLIPRN50", pa.list_(F32))]
    t = pq.read_table(path)
    n = TINY.n_items
    np.testing.assert_array_equal(t["item_id"].to_numpy(), np.arange(1, n + 1))
    assert (_list_lengths(t["txt_emb_BERT"]) == 768).all()
    assert (_list_lengths(t["img_emb_CLIPRN50"]) == 1024).all()
    n_tags = _list_lengths(t["item_tags"])
    assert n_tags.min() >= 1 and n_tags.max() <= 5
    info = pq.read_table(tiny.data_dir / "MicroLens_1M_x1" / "item_info.parquet", columns=["item_tags"])
    padded = np.asarray(info["item_tags"].combine_chunks().values).reshape(n + 1, 5)[1:]
    np.testing.assert_array_equal((padded > 0).sum(axis=1), n_tags)
    np.testing.assert_array_equal(padded[padded > 0], np.asarray(t["item_tags"].combine_chunks().values))
    titles = t["item_title"].to_pylist()
    n_empty = sum(1 for s in titles if s == "")
    assert n_empty == tiny.meta["n_empty_titles"] and 0 < n_empty < 0.05 * n
    assert all(s.split()[-1].startswith("#") for s in titles if s)
    # Rows' levels are their target item's levels.
    rows = pq.read_table(tiny.data_dir / "MicroLens_1M_x1" / "train.parquet",
                         columns=["item_id", "likes_level", "views_level"])
    likes = np.r_[0, t["likes_level"].to_numpy()]
    np.testing.assert_array_equal(likes[rows["item_id"].to_numpy()], rows["likes_level"].to_numpy())


def test_item_emb_and_item_seq(tiny: SynthResult) -> None:
    path = tiny.data_dir / "item_emb.parquet"
    names = ["item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4"]
    assert _schema(path) == [("item_id", I64)] + [(c, pa.list_(F32)) for c in names]
    t = pq.read_table(path)
    assert t.num_rows == TINY.n_items and all((_list_lengths(t[c]) == 128).all() for c in names)

    path = tiny.data_dir / "item_seq.parquet"
    assert _schema(path) == [("user_id", I64), ("item_seq", pa.list_(I64))]
    seq = pq.read_table(path)
    users = seq["user_id"].to_numpy()
    assert seq.num_rows == tiny.meta["rows"]["item_seq"] > np.unique(users).size  # several rows per user
    lengths = _list_lengths(seq["item_seq"])
    assert lengths.min() >= 1 and lengths.max() <= S
    assert (np.asarray(seq["item_seq"].combine_chunks().values) > 0).all()


def test_images(tiny: SynthResult) -> None:
    from PIL import Image

    files = sorted((tiny.data_dir / "item_images").glob("*.jpg"))
    missing = tiny.meta["n_missing_images"]
    assert 0 < missing < 0.05 * TINY.n_items
    assert len(files) == TINY.n_items - missing
    ids = {int(p.stem) for p in files}
    assert ids <= set(range(1, TINY.n_items + 1))
    with Image.open(files[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"


def test_meta_aucs_match_truth(tiny: SynthResult) -> None:
    meta = json.loads((tiny.hidden_dir / "meta.json").read_text())
    assert meta == json.loads(json.dumps(tiny.meta))
    d = tiny.data_dir / "MicroLens_1M_x1"
    truth = pq.read_table(tiny.hidden_dir / "test_truth.parquet")
    assert _schema(tiny.hidden_dir / "test_truth.parquet") == [("ID", I64), ("label", F64), ("p_true", F64)]
    np.testing.assert_array_equal(truth["ID"].to_numpy(), np.arange(TINY.test_rows))
    y, p = truth["label"].to_numpy(), truth["p_true"].to_numpy()
    assert meta["auc"]["oracle_test"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert meta["auc"]["expected_oracle_test"] == pytest.approx(expected_auc(p), abs=1e-12)

    vt = pq.read_table(tiny.hidden_dir / "valid_truth.parquet")
    assert _schema(tiny.hidden_dir / "valid_truth.parquet") == [("row", I64), ("p_true", F64)]
    valid = pq.read_table(d / "valid.parquet", columns=["label", "item_id"])
    yv, pv = valid["label"].to_numpy(), vt["p_true"].to_numpy()
    np.testing.assert_array_equal(vt["row"].to_numpy(), np.arange(TINY.valid_rows))
    assert meta["auc"]["oracle_valid"] == pytest.approx(roc_auc_score(yv, pv), abs=1e-12)

    # Popularity alone: the hidden item latents hold log popularity.
    latent = pq.read_table(tiny.hidden_dir / "item_latent.parquet", columns=["item_id", "log_pop"])
    log_pop = np.r_[-np.inf, latent["log_pop"].to_numpy()]
    assert meta["auc"]["popularity_valid"] == pytest.approx(
        roc_auc_score(yv, log_pop[valid["item_id"].to_numpy()]), abs=1e-12)
    # The oracle is a ceiling: well above popularity, and p_true is a probability.
    assert meta["auc"]["oracle_test"] > meta["auc"]["popularity_test"] + 0.1
    assert 0 < p.min() and p.max() < 1


def test_label_rate(tiny: SynthResult) -> None:
    path = tiny.data_dir / "MicroLens_1M_x1" / "train.parquet"
    y = pq.read_table(path, columns=["label"])["label"].to_numpy()
    assert abs(y.mean() - 0.25) <= 0.02
    assert tiny.meta["mean_p_true"]["train"] == pytest.approx(0.25, abs=0.005)


def _brute_force_auc(p: np.ndarray, score: np.ndarray | None = None) -> float:
    s = p if score is None else score
    pi, pj = p[:, None], p[None, :]
    w = pi * (1 - pj) * (1 - np.eye(p.size))  # pairs i ≠ j
    win = (s[:, None] > s[None, :]) + 0.5 * (s[:, None] == s[None, :])
    return float((w * win).sum() / w.sum())


@pytest.mark.parametrize("case", ["continuous", "ties", "extremes"])
def test_expected_auc_matches_brute_force(case: str) -> None:
    rng = np.random.default_rng(3)
    p = {"continuous": rng.random(300),
         "ties": rng.choice([0.1, 0.3, 0.3001, 0.7, 0.9], size=200),
         "extremes": np.r_[rng.random(50), [0.0, 0.0, 1.0, 1.0, 0.5]]}[case]
    assert expected_auc(p) == pytest.approx(_brute_force_auc(p), abs=1e-12)
    assert expected_auc(np.full(10, 0.4)) == pytest.approx(0.5)


@pytest.mark.parametrize("case", ["continuous", "tied scores", "reversed"])
def test_expected_auc_of_a_score_matches_brute_force(case: str) -> None:
    rng = np.random.default_rng(4)
    p = rng.random(250)
    score = {"continuous": p + rng.normal(0, 0.3, p.size),
             "tied scores": np.round(p * 4),  # 5 groups of equal score
             "reversed": -p}[case]
    assert expected_auc(p, score) == pytest.approx(_brute_force_auc(p, score), abs=1e-12)
    assert expected_auc(p, p) == pytest.approx(expected_auc(p), abs=1e-12)  # the oracle is the default
    assert expected_auc(p, -p) == pytest.approx(1 - expected_auc(p), abs=1e-12)


def test_draw_synth_is_what_synthesize_writes(tiny: SynthResult) -> None:
    """The in-memory draw (what benchmarks/signal_anatomy.py reads) holds exactly the rows written."""
    drawn = draw_synth(SynthSize.tiny, seed=0)
    tr, va, te = drawn.rows_by_split
    assert [i.size for i in drawn.rows_by_split] == [TINY.train_rows, TINY.valid_rows, TINY.test_rows]
    data = tiny.data_dir / "MicroLens_1M_x1"
    for name, idx in (("train", tr), ("valid", va), ("test", te)):
        t = pq.read_table(data / f"{name}.parquet")
        np.testing.assert_array_equal(t["item_id"].to_numpy(), drawn.rows.item[idx])
        np.testing.assert_array_equal(t["user_id"].to_numpy(), drawn.users.user_id[drawn.rows.user[idx]])
        if name != "test":
            np.testing.assert_array_equal(t["label"].to_numpy(), drawn.labels[idx])
    hidden = tiny.hidden_dir
    np.testing.assert_array_equal(pq.read_table(hidden / "valid_truth.parquet")["p_true"].to_numpy(),
                                  drawn.p_true[va])
    test_truth = pq.read_table(hidden / "test_truth.parquet")
    np.testing.assert_array_equal(test_truth["p_true"].to_numpy(), drawn.p_true[te])
    np.testing.assert_array_equal(test_truth["label"].to_numpy(), drawn.labels[te])
    assert drawn.beta0 == tiny.meta["beta0"]
    with pytest.raises(QinError, match="seed must be an integer"):
        draw_synth(SynthSize.tiny, seed=-1)
    with pytest.raises(QinError, match="unknown size 'huge'"):
        draw_synth("huge")


def test_deterministic_per_seed(tiny: SynthResult, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "a", SynthSize.tiny, seed=0, images=False, progress=False)
    other = synthesize(tmp_path / "b", SynthSize.tiny, seed=1, images=False, progress=False)
    for rel in ["MicroLens_1M_x1/train.parquet", "MicroLens_1M_x1/test.parquet",
                "MicroLens_1M_x1/item_info.parquet", "item_feature.parquet", "item_emb.parquet",
                "item_seq.parquet", "hidden/test_truth.parquet"]:
        first = pq.read_table(tiny.data_dir / rel)
        assert first.equals(pq.read_table(again.data_dir / rel)), rel
        assert not first.equals(pq.read_table(other.data_dir / rel)), rel
    assert again.meta["auc"] == tiny.meta["auc"]
    assert not (again.data_dir / "item_images").exists()


def test_test_label_const0_and_rerun_replaces(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = synthesize(out, SynthSize.tiny, seed=0, images=True, progress=False)
    assert first.meta["outputs"] == ["MicroLens_1M_x1", "item_feature.parquet", "item_emb.parquet",
                                     "item_seq.parquet", "item_images", "hidden"]
    (out / "notes.txt").write_text("mine")  # not an output: must survive
    res = synthesize(out, SynthSize.tiny, seed=0, test_label=True, images=False, progress=False)
    path = out / "MicroLens_1M_x1" / "test.parquet"
    assert _schema(path) == [("ID", I64)] + ROW_SCHEMA + [("label", F64)]
    assert (pq.read_table(path, columns=["label"])["label"].to_numpy() == 0.0).all()
    assert res.meta["test_label"] == "const0" and "item_images" not in res.meta["outputs"]
    assert not (out / "item_images").exists(), "outputs of the previous run are replaced as a whole"
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    synthesize(out, SynthSize.tiny, seed=1, images=True, progress=False)  # and images come back
    assert (out / "item_images").is_dir() and (out / "notes.txt").read_text() == "mine"


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (relative) with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in folder.rglob("*")}


def _users_raw_files(folder: Path) -> None:
    """The organisers' raw files as a user unpacks them, without MicroLens_1M_x1/."""
    (folder / "item_images").mkdir(parents=True)
    (folder / "item_images" / "1.jpg").write_bytes(b"\xff\xd8 a real cover")
    (folder / "item_feature.parquet").write_bytes(b"PAR1 the organisers' item features")


def test_cli_refuses_a_folder_of_real_raw_files(tmp_path: Path) -> None:
    """Regression: the guard looked at MicroLens_1M_x1/ only, and the install then deleted the user's
    item_feature.parquet and item_images/."""
    out = tmp_path / "raw"
    _users_raw_files(out)
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["synth", "--size", "tiny", "--no-images", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert str(out) in message and "item_feature.parquet, item_images" in message
    assert "empty folder" in message and "Traceback" not in result.output
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"], "no temp folder left"


def test_refuses_output_names_the_earlier_run_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "data"
    synthesize(out, SynthSize.tiny, seed=0, images=False, progress=False)
    (out / "item_images").mkdir()  # the user drops real covers into a no-images demo folder
    (out / "item_images" / "1.jpg").write_bytes(b"a real cover")
    before = _snapshot(out)
    with pytest.raises(QinError, match="holds item_images, not written by"):
        synthesize(out, SynthSize.tiny, seed=1, images=False, progress=False)
    assert _snapshot(out) == before
    # A marker that is not qin's, or that lists nothing, proves nothing: every entry is foreign.
    shutil.rmtree(out / "item_images")
    meta_path = out / "hidden" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for marker in [{**meta, "generator": "someone else"}, {**meta, "outputs": "all"}, [meta], "{not json"]:
        meta_path.write_text(marker if isinstance(marker, str) else json.dumps(marker))
        with pytest.raises(QinError, match="MicroLens_1M_x1, hidden, item_emb.parquet"):
            synthesize(out, SynthSize.tiny, progress=False)
    # A marker of a run before meta.json listed its outputs: what that run always wrote.
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "outputs"}))
    synthesize(out, SynthSize.tiny, seed=2, images=False, progress=False)
    assert json.loads(meta_path.read_text())["seed"] == 2


def test_a_folder_without_marker_is_refused_even_without_output_names(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QinError, match=r"holds notes.txt, not written by `qin synth` \(no hidden/meta.json"):
        synthesize(out, SynthSize.tiny, images=False, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    synthesize(tmp_path / "empty", SynthSize.tiny, images=False, progress=False)  # an empty folder is fine


def _written_by_qin(folder: Path) -> list[str]:
    """Every file under folder (relative, sorted), as hidden/files.txt lists them; notes.txt excluded."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name != "notes.txt")


def test_cli_refuses_files_the_user_added_inside_outputs_and_keeps_them(tmp_path: Path) -> None:
    """Regression: a re-run replaced MicroLens_1M_x1/ and hidden/ whole, deleting the user's files in them."""
    out = tmp_path / "s1"
    first = synthesize(out, SynthSize.tiny, seed=1, images=True, progress=False)
    assert first.meta["file_list"] == "hidden/files.txt"
    listed = (out / "hidden" / "files.txt").read_text().splitlines()
    assert listed == _written_by_qin(out) and "hidden/files.txt" in listed and "item_images/1.jpg" in listed
    (out / "MicroLens_1M_x1" / "extra.parquet").write_bytes(b"PAR1 my own split")
    (out / "hidden" / "mine").mkdir()
    (out / "hidden" / "mine" / "keep.txt").write_text("my notes")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    result = CliRunner().invoke(app, ["synth", "--size", "tiny", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    added = "MicroLens_1M_x1/extra.parquet, hidden/mine/keep.txt"
    assert f"{out} holds files `qin synth` did not write: {added};" in message
    assert "move them out first" in message and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert _snapshot(out) == before, "every file byte-identical"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"], "no temp folder left"
    # Symlinks and empty folders count too (never followed); deleted files of qin's are fine.
    (out / "MicroLens_1M_x1" / "extra.parquet").unlink()
    shutil.rmtree(out / "hidden" / "mine")
    (out / "item_images" / "covers").mkdir()
    (out / "MicroLens_1M_x1" / "real").symlink_to(tmp_path)
    (out / "MicroLens_1M_x1" / "valid.parquet").unlink()
    with pytest.raises(QinError, match=r"did not write: MicroLens_1M_x1/real, item_images/covers/;"):
        synthesize(out, SynthSize.tiny, seed=1, images=False, progress=False)
    (out / "MicroLens_1M_x1" / "real").unlink()
    (out / "item_images" / "covers").rmdir()
    for image in (out / "item_images").iterdir():  # an output folder emptied by the user is fine too
        image.unlink()
    again = synthesize(out, SynthSize.tiny, seed=1, images=False, progress=False)  # a normal re-run works
    assert "item_images" not in again.meta["outputs"] and not (out / "item_images").exists()
    assert (out / "hidden" / "files.txt").read_text().splitlines() == _written_by_qin(out)
    synthesize(out, SynthSize.tiny, seed=1, images=True, progress=False)  # and with images
    assert (out / "hidden" / "files.txt").read_text().splitlines() == _written_by_qin(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1"]


def test_files_added_during_the_run_are_found_before_the_install(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    synthesize(out, SynthSize.tiny, seed=0, images=False, progress=False)
    from qin.synth import generate

    real = generate.write_item_seq

    def and_the_user_adds_a_file(*args: object, **kwargs: object) -> object:
        (out / "MicroLens_1M_x1" / "late.parquet").write_bytes(b"added while qin ran")
        return real(*args, **kwargs)

    monkeypatch.setattr("qin.synth.generate.write_item_seq", and_the_user_adds_a_file)
    with pytest.raises(QinError, match="did not write: MicroLens_1M_x1/late.parquet;"):
        synthesize(out, SynthSize.tiny, seed=1, images=False, progress=False)
    assert (out / "MicroLens_1M_x1" / "late.parquet").read_bytes() == b"added while qin ran"
    assert json.loads((out / "hidden" / "meta.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_marker_without_file_list_is_checked_by_entry_as_before(tmp_path: Path) -> None:
    """Folders written before hidden/files.txt existed (data/demo) are still accepted."""
    out = tmp_path / "data"
    synthesize(out, SynthSize.tiny, seed=0, images=False, progress=False)
    meta_path = out / "hidden" / "meta.json"
    meta = json.loads(meta_path.read_text())
    (out / "hidden" / "files.txt").unlink()
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "file_list"}))
    (out / "MicroLens_1M_x1" / "extra.parquet").write_bytes(b"not provable either way")
    res = synthesize(out, SynthSize.tiny, seed=1, images=False, progress=False)
    assert res.meta["seed"] == 1 and (out / "hidden" / "files.txt").is_file()
    # A marker that declares its list but lost it proves nothing about the files beside it.
    (out / "hidden" / "files.txt").unlink()
    before = _snapshot(out)
    with pytest.raises(QinError, match=r"hidden/files.txt cannot be read \(no such file or directory\)"):
        synthesize(out, SynthSize.tiny, seed=2, images=False, progress=False)
    assert _snapshot(out) == before


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path: Path) -> None:
    """A `kill -9` leaves .<out>.tmp-<pid>-<random>/; the next run removes it unless its process lives."""
    dead_pid = 2**22 + 12345  # above Linux's largest pid_max: never a live process
    assert not process_alive(dead_pid) and process_alive(os.getppid())
    stale = tmp_path / f".data.tmp-{dead_pid}-abc123_x"
    running = tmp_path / f".data.tmp-{os.getppid()}-def456_y"  # a concurrent run of a live process
    other = tmp_path / f".other.tmp-{dead_pid}-abc123_x"  # another output's: not ours to judge here
    for folder in (stale, running, other):
        (folder / "MicroLens_1M_x1").mkdir(parents=True)
        (folder / TEMP_MARKER).write_text(folder.name.split("-")[1])  # as make_temp_dir writes it
    synthesize(tmp_path / "data", SynthSize.tiny, images=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, other.name, "data"])


def test_a_look_alike_folder_without_the_marker_is_never_deleted(tmp_path: Path) -> None:
    """A user's `.real.tmp-99996-abc` (dead pid, no make_temp_dir marker) survives; a real stale one goes."""
    dead_pid = 2**22 + 12345  # above Linux's largest pid_max: never a live process
    look_alike = tmp_path / f".real.tmp-{dead_pid}-abc"
    (look_alike / "sub").mkdir(parents=True)
    (look_alike / "sub" / "thesis.txt").write_text("mine")
    wrong_pid = tmp_path / f".real.tmp-{dead_pid}-def"  # a marker naming another pid proves nothing
    wrong_pid.mkdir()
    (wrong_pid / TEMP_MARKER).write_text("1")
    stale = tmp_path / f".real.tmp-{dead_pid}-k1ll3d"
    (stale / "hidden").mkdir(parents=True)
    (stale / TEMP_MARKER).write_text(f"{dead_pid}\n")
    synthesize(tmp_path / "real", SynthSize.tiny, images=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([look_alike.name, wrong_pid.name, "real"])
    assert (look_alike / "sub" / "thesis.txt").read_text() == "mine"
    assert (wrong_pid / TEMP_MARKER).read_text() == "1"


def test_a_quoted_tilde_means_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out '~/x'`: pyarrow expanded ~ and Python did not: a failed write and a stray ./~ folder."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    res = synthesize(Path("~/x"), SynthSize.tiny, images=False, progress=False)
    assert res.data_dir == home / "x" and (home / "x" / "MicroLens_1M_x1" / "item_info.parquet").is_file()
    result = CliRunner().invoke(app, ["synth", "--size", "tiny", "--no-images", "--seed", "1",
                                      "--out", "~/x"])
    assert result.exit_code == 0, result.output
    assert json.loads((home / "x" / "hidden" / "meta.json").read_text())["seed"] == 1
    assert sorted(p.name for p in home.iterdir()) == ["x"], "no temp folder left"
    assert list(cwd.iterdir()) == [], "nothing named ~ in the current folder"


def test_a_killed_run_leaves_a_temp_folder_the_next_run_removes(tmp_path: Path) -> None:
    code = ("import os, signal, sys; from pathlib import Path; from qin.layout import make_temp_dir; "
            "(make_temp_dir(Path(sys.argv[1])) / 'hidden').mkdir(); os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], check=False)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == [".data.tmp"]
    synthesize(tmp_path / "data", SynthSize.tiny, images=False, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def _no_space(path: Path, *args: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_os_errors_are_one_line_errors_and_leave_no_temp_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qin.synth.generate.write_item_seq", _no_space)
    out = tmp_path / "data"
    with pytest.raises(QinError, match=r"item_seq.parquet: no space left on the device \(writing the synth"):
        synthesize(out, SynthSize.tiny, images=False, progress=False)
    assert list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["synth", "--size", "tiny", "--no-images", "--out", str(out)])
    assert result.exit_code == 2 and "no space left" in result.output and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []

    def read_only(prefix: str, dir: Path) -> str:  # noqa: A002 - tempfile.mkdtemp's own name
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr("qin.layout.tempfile.mkdtemp", read_only)
    with pytest.raises(QinError, match=f"{tmp_path}: permission denied"):
        synthesize(out, SynthSize.tiny, images=False, progress=False)


def test_an_os_error_without_a_file_name_names_the_output_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's and PIL's write errors often carry no file name: the message named '(path unknown)'."""
    def no_space_unnamed(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("qin.synth.generate.write_item_seq", no_space_unnamed)
    out = tmp_path / "data"
    with pytest.raises(QinError, match=f"^{out}: no space left on the device"):
        synthesize(out, SynthSize.tiny, images=False, progress=False)
    result = CliRunner().invoke(app, ["synth", "--size", "tiny", "--no-images", "--out", str(out)])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"{out}: no space left" in message and "path unknown" not in message
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_is_not_converted_and_leaves_no_temp_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("qin.synth.generate.write_item_seq", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path / "data", SynthSize.tiny, images=False, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_user_errors(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(QinError, match="is a file"):
        synthesize(a_file, SynthSize.tiny, progress=False)
    with pytest.raises(QinError, match="is a file"):
        synthesize(a_file / "sub", SynthSize.tiny, progress=False)
    real = tmp_path / "real"
    (real / "MicroLens_1M_x1").mkdir(parents=True)
    with pytest.raises(QinError, match="not written by"):
        synthesize(real, SynthSize.tiny, progress=False)
    with pytest.raises(QinError, match="seed"):
        synthesize(tmp_path / "x", SynthSize.tiny, seed=-1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "real"]


def test_params_with_overrides_and_errors() -> None:
    params = params_with(["w_att_q=2.5", "attention=relu", "d_lat=32"])
    assert (params.w_att_q, params.attention, params.d_lat) == (2.5, "relu", 32)
    assert params_with([]) == DEFAULT_PARAMS
    bad_assignments = ["w_att_q", "no_such_field=1", "tag_count_p=0.5", "w_att_q=high", "attention=max",
                       "d_lat=1.5"]
    for bad in bad_assignments:
        with pytest.raises(QinError, match="attention|generator parameter"):
            params_with([bad])


def test_relu_attention_changes_only_the_labels(tiny: SynthResult, tmp_path: Path) -> None:
    """The ReLU-shaped s_att (a diagnostic) keeps every input file and redraws only the clicks."""
    relu = synthesize(tmp_path / "relu", SynthSize.tiny, seed=0, images=False, progress=False,
                      params=params_with(["attention=relu", "relu_scale=1.4"]))
    assert relu.meta["params"]["attention"] == "relu"
    valid = "MicroLens_1M_x1/valid.parquet"
    features = ["user_id", "item_seq", "item_id", "likes_level", "views_level"]
    assert pq.read_table(relu.data_dir / valid, columns=features).equals(
        pq.read_table(tiny.data_dir / valid, columns=features))
    assert relu.meta["auc"]["oracle_valid"] != tiny.meta["auc"]["oracle_valid"]
    assert 0.25 - 0.005 <= relu.meta["mean_p_true"]["train"] <= 0.25 + 0.005
