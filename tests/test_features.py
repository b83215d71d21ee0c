"""`qin.features`: raw parquet -> feature folder, on hand-written tiny files.

Every build uses ``chunk_rows=3`` so that splits span several chunks: row offsets, validation row
numbers and the memory-mapped writes are all exercised across chunk boundaries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from qin.config import DataConfig
from qin.errors import QinError
from qin.features import BuildResult, build_features, feature_dir_for, load_features
from qin.features import pipeline as pipeline_module
from qin.features.folder import feature_dir_of
from qin.features.steps import left_pad, recent_nonzero

N_ITEMS = 30  # V: item ids 0..29, 0 = padding
SEQ_LEN = 8  # S: stored history length
EMB_DIM = 128
CHUNK = 3


# ----------------------------------------------------------------------------- raw file helpers


def histories(n_rows: int, seq_len: int = SEQ_LEN, side: str = "left") -> list[list[int]]:
    """Fixed-length histories with 0..seq_len+2 non-zero items, padded with 0 on ``side``."""
    rows = []
    for r in range(n_rows):
        k = min(r % (seq_len + 3), seq_len)
        items = [1 + (r * 7 + j * 3) % (N_ITEMS - 1) for j in range(k)]
        pad = [0] * (seq_len - k)
        rows.append(pad + items if side == "left" else items + pad)
    return rows


def split_frame(n_rows: int = 10, seq: list[list[int]] | None = None, test: bool = False) -> pl.DataFrame:
    """A valid train/valid (or test, with ID and no label) frame; column order differs on purpose."""
    seq = histories(n_rows) if seq is None else seq
    n_rows = len(seq)
    columns: dict[str, pl.Series] = {}
    if test:
        columns["ID"] = pl.Series(range(n_rows), dtype=pl.Int64)
    columns |= {
        "item_seq": pl.Series(seq, dtype=pl.List(pl.Int64)),
        "user_id": pl.Series([100 + r // 2 for r in range(n_rows)], dtype=pl.Int64),
        "item_id": pl.Series([1 + (r * 5) % (N_ITEMS - 1) for r in range(n_rows)], dtype=pl.Int64),
        "likes_level": pl.Series([r % 10 for r in range(n_rows)], dtype=pl.Int64),
        "views_level": pl.Series([(9 - r) % 10 for r in range(n_rows)], dtype=pl.Int64),
    }
    if not test:
        columns["label"] = pl.Series([float(r % 4 == 0) for r in range(n_rows)], dtype=pl.Float64)
    return pl.DataFrame(columns)


def item_info_frame(
    n_items: int = N_ITEMS, seed: int = 0, emb_dtype: type[pl.DataType] = pl.Float64
) -> pl.DataFrame:
    """item_info with row i = item i, row 0 the all-zero padding item, 5 tags per item."""
    rng = np.random.default_rng(seed)
    tags = [[0] * 5] + [[int(t) for t in rng.integers(0, 40, 5)] for _ in range(n_items - 1)]
    emb = rng.standard_normal((n_items, EMB_DIM))
    emb[0] = 0.0
    return pl.DataFrame(
        {
            "item_id": pl.Series(range(n_items), dtype=pl.Int64),
            "item_tags": pl.Series(tags, dtype=pl.List(pl.Int64)),
            "item_emb_d128": pl.Series(emb.tolist(), dtype=pl.List(emb_dtype)),
        }
    )


def write_raw(
    root: Path,
    train: pl.DataFrame | None = None,
    valid: pl.DataFrame | None = None,
    test: pl.DataFrame | None = None,
    item_info: pl.DataFrame | None = None,
) -> Path:
    """Write a raw folder ``root/raw`` (defaults: 10 train, 7 valid, 8 test rows) and return it."""
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (split_frame(10) if train is None else train).write_parquet(raw / "train.parquet")
    (split_frame(7) if valid is None else valid).write_parquet(raw / "valid.parquet")
    (split_frame(8, test=True) if test is None else test).write_parquet(raw / "test.parquet")
    (item_info_frame() if item_info is None else item_info).write_parquet(raw / "item_info.parquet")
    return raw


def build(
    raw: Path,
    out: Path,
    max_len: int = 5,
    item_info: Path | None = None,
    force: bool = False,
    expected_sources: dict[str, str] | None = None,
) -> BuildResult:
    return build_features(
        raw,
        out,
        max_len,
        item_info=item_info,
        force=force,
        progress=False,
        chunk_rows=CHUNK,
        expected_sources=expected_sources,
    )


def no_build(*args: object, **kwargs: object) -> None:
    """Stands in for `pipeline._build` where a build must be refused before any work."""
    pytest.fail("the build started")


def expected_history(seq: list[int], max_len: int) -> list[int]:
    """Plain-Python reference: last max_len non-zero items, most recent last, left-padded with 0."""
    kept = [x for x in seq if x != 0][-max_len:]
    return [0] * (max_len - len(kept)) + kept


def leftovers(root: Path) -> list[str]:
    """Temp / old folders anywhere under ``root`` that a build must never leave behind."""
    return sorted(p.name for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------- outputs


def test_outputs_shapes_dtypes_and_manifest(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "features" / "raw-L5"
    result = build(raw, out)
    assert result.rebuilt and result.feature_dir == out and result.seconds > 0

    fs = load_features(out)
    m = fs.manifest
    tags = item_info_frame()["item_tags"].to_list()
    assert m["format_version"] == 1 and m["max_len"] == 5
    assert m["item_vocab"] == N_ITEMS and m["level_vocab"] == 11
    assert m["tags_per_item"] == 5 and m["mm_dim"] == EMB_DIM
    assert m["tag_vocab"] == max(max(t) for t in tags) + 2
    assert m["config"] == {
        "raw_dir": str(raw.resolve()),
        "item_info": str((raw / "item_info.parquet").resolve()),
        "max_len": 5,
    }
    assert set(m["sources"]) == {"train.parquet", "valid.parquet", "test.parquet", "item_info.parquet"}
    for entry in m["sources"].values():
        assert Path(entry["path"]).stat().st_size == entry["size"] and len(entry["sha256"]) == 64
    assert m["splits"]["train"] == {
        "rows": 10,
        "has_label": True,
        "mean_history_len": pytest.approx(np.mean([min(r % 11, 8, 5) for r in range(10)])),
        "positive_rate": pytest.approx(0.3),
        "input_seq_len": SEQ_LEN,
    }
    assert m["splits"]["test"]["has_label"] is False and m["splits"]["test"]["positive_rate"] is None
    assert "T" in m["created"] and m["qin_version"]

    assert fs.item_tags.dtype == np.int32 and fs.item_tags.shape == (N_ITEMS, 5)
    assert fs.item_emb.dtype == np.float32 and fs.item_emb.shape == (N_ITEMS, EMB_DIM)
    np.testing.assert_array_equal(fs.item_tags, np.array(tags))
    np.testing.assert_allclose(fs.item_emb, np.array(item_info_frame()["item_emb_d128"].to_list()), rtol=1e-6)
    assert not fs.item_emb[0].any()

    for name, n_rows in (("train", 10), ("valid", 7), ("test", 8)):
        s = fs.split(name)
        frame = split_frame(n_rows, test=name == "test")
        assert s.item_id.dtype == np.int32 and s.item_id.shape == (n_rows,)
        assert s.history.dtype == np.int32 and s.history.shape == (n_rows, 5)
        assert s.likes_level.dtype == np.int8 and s.views_level.dtype == np.int8
        assert s.user_id.dtype == np.int64
        assert isinstance(s.history, np.memmap)
        np.testing.assert_array_equal(s.item_id, frame["item_id"].to_numpy())
        np.testing.assert_array_equal(s.user_id, frame["user_id"].to_numpy())
        if name == "test":
            assert s.label is None and not (out / "test" / "label.npy").exists()
            assert s.ids is not None and s.ids.dtype == np.int64
            np.testing.assert_array_equal(s.ids, np.arange(n_rows))
        else:
            assert s.ids is None and s.label is not None and s.label.dtype == np.float32
            np.testing.assert_array_equal(s.label, frame["label"].to_numpy())
    assert not (out / "train" / "ID.npy").exists()
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("seq_len", [3, 8, 12])
def test_history_keeps_most_recent_nonzero_left_padded(tmp_path: Path, side: str, seq_len: int) -> None:
    seq = histories(11, seq_len, side)
    seq[4] = [0] * seq_len  # a user with no history at all: an all-padding row
    raw = write_raw(tmp_path, train=split_frame(seq=seq))
    out = tmp_path / "f"
    build(raw, out, max_len=5)
    history = load_features(out).split("train").history
    np.testing.assert_array_equal(history, np.array([expected_history(s, 5) for s in seq]))


def test_history_interior_zeros_and_fixed_size_list_input(tmp_path: Path) -> None:
    seq = [[0, 3, 0, 4, 5, 0], [6, 0, 0, 0, 0, 7], [1, 2, 3, 4, 5, 6]]
    train = split_frame(seq=seq).with_columns(pl.col("item_seq").cast(pl.Array(pl.Int64, 6)))
    raw = write_raw(tmp_path, train=train, item_info=item_info_frame(emb_dtype=pl.Float32))
    build(raw, tmp_path / "f", max_len=4)
    history = load_features(tmp_path / "f").split("train").history
    assert history.tolist() == [[0, 3, 4, 5], [0, 0, 6, 7], [3, 4, 5, 6]]


def test_left_pad_matches_reference() -> None:
    rng = np.random.default_rng(1)
    lists = [rng.integers(1, 100, rng.integers(0, 7)).tolist() for _ in range(200)]
    history, lengths = left_pad(pl.Series(lists, dtype=pl.List(pl.Int32)), 6)
    assert history.dtype == np.int32 and history.shape == (200, 6)
    assert history.tolist() == [expected_history(x, 6) for x in lists]
    assert lengths.tolist() == [len(x) for x in lists]


def test_recent_nonzero_is_a_pure_expression() -> None:
    frame = pl.DataFrame({"s": [[0, 0, 1, 2, 3], [4, 5, 0, 0, 0], [0, 0, 0, 0, 0], [None, 6, None, 0, 7]]})
    out = frame.lazy().select(recent_nonzero(pl.col("s"), 2)).collect()
    assert out["s"].to_list() == [[2, 3], [4, 5], [], [6, 7]]  # null elements count as padding


def test_levels_are_shifted_by_one(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    build(raw, tmp_path / "f")
    s = load_features(tmp_path / "f").split("train")
    assert s.likes_level.tolist() == [r % 10 + 1 for r in range(10)]
    assert s.views_level.tolist() == [(9 - r) % 10 + 1 for r in range(10)]
    assert s.likes_level.min() >= 1 and s.likes_level.max() <= 10


@pytest.mark.parametrize(
    "label",
    [pl.lit(0.0), pl.lit(-1, dtype=pl.Int64), pl.lit("?")],
    ids=["constant-0.0", "constant--1", "string"],
)
def test_test_label_column_is_ignored(tmp_path: Path, label: pl.Expr) -> None:
    raw = write_raw(tmp_path, test=split_frame(8, test=True).with_columns(label.alias("label")))
    build(raw, tmp_path / "f")
    fs = load_features(tmp_path / "f")
    assert fs.split("test").label is None and fs.manifest["splits"]["test"]["has_label"] is False


# ----------------------------------------------------------------------------- bad inputs

Mutation = Callable[[Path], None]


def _rewrite(file: str, change: Callable[[pl.DataFrame], pl.DataFrame]) -> Mutation:
    def mutate(raw: Path) -> None:
        path = raw / file
        change(pl.read_parquet(path)).write_parquet(path)

    return mutate


def _set(column: str, row: int, value: object, file: str = "train.parquet") -> Mutation:
    """Set one cell (lists included) of one file."""

    def change(frame: pl.DataFrame) -> pl.DataFrame:
        values = frame[column].to_list()
        values[row] = value
        return frame.with_columns(pl.Series(column, values, dtype=frame.schema[column]))

    return _rewrite(file, change)


def _ragged(row: int) -> Mutation:
    def change(frame: pl.DataFrame) -> pl.DataFrame:
        values = frame["item_seq"].to_list()
        values[row] = values[row] + [1]
        return frame.with_columns(pl.Series("item_seq", values, dtype=pl.List(pl.Int64)))

    return _rewrite("train.parquet", change)


def _swap_item_rows(frame: pl.DataFrame) -> pl.DataFrame:
    order = list(range(frame.height))
    order[4], order[5] = 5, 4
    return frame[order]


def _labels(file: str, value: float) -> Mutation:
    """Every label of one split set to ``value`` (a one-class split)."""
    return _rewrite(file, lambda f: f.with_columns(pl.lit(value, dtype=pl.Float64).alias("label")))


def _ids(change: Callable[[pl.Series], pl.Series]) -> Mutation:
    """test.parquet with its ID column changed (IDs must be 0..n-1 in row order)."""
    return _rewrite("test.parquet", lambda f: f.with_columns(change(f["ID"]).alias("ID")))


BAD_INPUTS: dict[str, tuple[Mutation, str, str, int | None]] = {
    # name: (mutation, file, column (or text) in the message, first bad row or None)
    "missing file": (lambda raw: (raw / "valid.parquet").unlink(), "valid.parquet", "not found", None),
    "missing item_info": (
        lambda raw: (raw / "item_info.parquet").unlink(),
        "item_info.parquet",
        "not found",
        None,
    ),
    "missing column": (
        _rewrite("train.parquet", lambda f: f.drop("likes_level")),
        "train.parquet",
        "likes_level",
        None,
    ),
    "test without ID": (_rewrite("test.parquet", lambda f: f.drop("ID")), "test.parquet", "ID", None),
    "item_seq of floats": (
        _rewrite("train.parquet", lambda f: f.with_columns(pl.col("item_seq").cast(pl.List(pl.Float64)))),
        "train.parquet",
        "item_seq",
        None,
    ),
    "item_seq not a list": (
        _rewrite("valid.parquet", lambda f: f.with_columns(pl.col("item_id").alias("item_seq"))),
        "valid.parquet",
        "item_seq",
        None,
    ),
    "label string": (
        _rewrite("train.parquet", lambda f: f.with_columns(pl.col("label").cast(pl.String))),
        "train.parquet",
        "label",
        None,
    ),
    "label NaN": (_set("label", 7, float("nan")), "train.parquet", "label", 7),
    "label null": (_set("label", 2, None, "valid.parquet"), "valid.parquet", "label", 2),
    "label 2": (_set("label", 4, 2.0), "train.parquet", "label", 4),
    "target item_id 0": (_set("item_id", 1, 0), "train.parquet", "item_id", 1),
    "target item_id too large": (_set("item_id", 5, N_ITEMS, "test.parquet"), "test.parquet", "item_id", 5),
    "target item_id negative": (_set("item_id", 8, -3), "train.parquet", "item_id", 8),
    "history id too large": (_set("item_seq", 6, [0] * 7 + [N_ITEMS]), "train.parquet", "item_seq", 6),
    "history id negative": (
        _set("item_seq", 3, [0] * 7 + [-1], "valid.parquet"),
        "valid.parquet",
        "item_seq",
        3,
    ),
    "ragged history": (_ragged(4), "train.parquet", "item_seq", 4),
    "empty history": (_set("item_seq", 2, []), "train.parquet", "item_seq", 2),
    "null history": (_set("item_seq", 9, None), "train.parquet", "item_seq", 9),
    # a null item would be dropped like padding, shifting the row's history
    "null item in history": (
        _set("item_seq", 4, [0] * 5 + [3, None, 5]),
        "train.parquet",
        "'item_seq' holds a null item id",
        4,
    ),
    "null item in history, row 0": (
        _set("item_seq", 0, [None] * 8, "valid.parquet"),
        "valid.parquet",
        "'item_seq' holds a null item id",
        0,
    ),
    "null item in fixed-size history": (
        _rewrite(
            "test.parquet",
            lambda f: f.with_columns(
                pl.Series("item_seq", [s if r != 7 else [1, None] + s[2:] for r, s in
                                       enumerate(f["item_seq"].to_list())], dtype=pl.Array(pl.Int64, SEQ_LEN))
            ),
        ),
        "test.parquet",
        "'item_seq' holds a null item id",
        7,
    ),
    "empty history in row 0": (_set("item_seq", 0, [], "test.parquet"), "test.parquet", "item_seq", 0),
    "likes_level 10": (_set("likes_level", 5, 10), "train.parquet", "likes_level", 5),
    "views_level -1": (_set("views_level", 0, -1, "test.parquet"), "test.parquet", "views_level", 0),
    "empty split": (_rewrite("valid.parquet", lambda f: f.head(0)), "valid.parquet", "0 rows", None),
    "item_info row i not item i": (
        _rewrite("item_info.parquet", _swap_item_rows),
        "item_info.parquet",
        "item_id",
        4,
    ),
    "item_tags length 4": (
        _set("item_tags", 2, [1, 2, 3, 4], "item_info.parquet"),
        "item_info.parquet",
        "item_tags",
        2,
    ),
    "item_emb NaN": (
        _set("item_emb_d128", 6, [float("nan")] * EMB_DIM, "item_info.parquet"),
        "item_info.parquet",
        "item_emb_d128",
        6,
    ),
    "item_emb null in row 0": (
        _set("item_emb_d128", 0, None, "item_info.parquet"),
        "item_info.parquet",
        "item_emb_d128",
        0,
    ),
    "item_emb length": (
        _set("item_emb_d128", 3, [0.5] * 7, "item_info.parquet"),
        "item_info.parquet",
        "item_emb_d128",
        3,
    ),
    "valid all clicks": (
        _labels("valid.parquet", 1.0),
        "valid.parquet",
        "only one class (all 7 rows are 1)",
        None,
    ),
    "valid no clicks": (
        _labels("valid.parquet", 0.0),
        "valid.parquet",
        "only one class (all 7 rows are 0)",
        None,
    ),
    "train all clicks": (
        _labels("train.parquet", 1.0),
        "train.parquet",
        "only one class (all 10 rows are 1)",
        None,
    ),
    "test ID shuffled": (
        _ids(lambda ids: ids.scatter([2, 3], [3, 2])),
        "test.parquet",
        "'ID' must equal the row index",
        2,
    ),
    "test ID duplicated": (
        _set("ID", 5, 4, "test.parquet"),
        "test.parquet",
        "'ID' must equal the row index",
        5,
    ),
    "test ID offset": (_ids(lambda ids: ids + 1), "test.parquet", "'ID' must equal the row index", 0),
    "test ID null": (_set("ID", 6, None, "test.parquet"), "test.parquet", "'ID' is null", 6),
    "tag id huge": (
        _set("item_tags", 3, [1, 2, 2_000_000_000, 4, 5], "item_info.parquet"),
        "item_info.parquet",
        "item_tags' holds a tag id above 10,000,000",
        3,
    ),
    "item_emb overflows float32": (
        _set("item_emb_d128", 5, [0.5] * 10 + [-1e300] + [0.5] * (EMB_DIM - 11), "item_info.parquet"),
        "item_info.parquet",
        "'item_emb_d128' holds a value that overflows float32",
        5,
    ),
    "item_emb ints": (
        _rewrite(
            "item_info.parquet", lambda f: f.with_columns(pl.col("item_emb_d128").cast(pl.List(pl.Int64)))
        ),
        "item_info.parquet",
        "item_emb_d128",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_column_row_and_leaves_nothing(tmp_path: Path, case: str) -> None:
    mutate, file, column, row = BAD_INPUTS[case]
    raw = write_raw(tmp_path)
    mutate(raw)
    out = tmp_path / "features" / "raw-L5"
    with pytest.raises(QinError) as info:
        build(raw, out)
    message = str(info.value)
    assert file in message and column in message, message
    if row is not None:
        assert f"row {row}," in message, message
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_one_class_and_id_messages_say_why(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    _labels("valid.parquet", 1.0)(raw)
    with pytest.raises(QinError) as info:
        build(raw, tmp_path / "f")
    assert str(info.value).startswith(
        f"{raw / 'valid.parquet'}: column 'label' holds only one class (all 7 rows are 1); "
        "validation AUC is undefined"
    )

    raw = write_raw(tmp_path)
    _labels("train.parquet", 1.0)(raw)
    with pytest.raises(QinError, match="positive-only logs") as info:
        build(raw, tmp_path / "f")
    assert "train.parquet" in str(info.value) and "\n" not in str(info.value)

    raw = write_raw(tmp_path)
    _ids(lambda ids: ids + 100)(raw)
    with pytest.raises(QinError) as info:
        build(raw, tmp_path / "f")
    message = str(info.value)
    assert "IDs 0..n-1 in test-row order" in message and "duplicated, shuffled or offset" in message
    assert message.endswith("(first bad row 0, 0-based: 100)"), message


def test_float32_overflow_quotes_the_value_and_largest_float32_passes(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    _set("item_emb_d128", 2, [1e300] * EMB_DIM, "item_info.parquet")(raw)
    with pytest.raises(QinError, match=r"row 2, 0-based: 1e\+300\)"):
        build(raw, tmp_path / "f")

    largest = float(np.finfo(np.float32).max)
    _set("item_emb_d128", 2, [-largest] * EMB_DIM, "item_info.parquet")(raw)
    _set("item_tags", 1, [1, 2, 3, 4, 10_000_000], "item_info.parquet")(raw)  # MAX_TAG_ID itself is fine
    build(raw, tmp_path / "f")
    fs = load_features(tmp_path / "f")
    assert np.isfinite(fs.item_emb).all() and fs.item_emb[2, 0] == -largest
    assert fs.manifest["tag_vocab"] == 10_000_002


def test_bad_input_keeps_previous_complete_build(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    before = (out / "manifest.json").read_text()
    _set("label", 8, 3.0)(raw)
    with pytest.raises(QinError, match="row 8"):
        build(raw, out)
    assert (out / "manifest.json").read_text() == before
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_folder_that_is_not_a_feature_folder(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(QinError, match="not a feature folder"):
        build(raw, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_rebuild_refuses_a_folder_holding_files_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    (out / "myrun").mkdir()
    (out / "myrun" / "best.pt").write_text("weights")  # `qin train --run-dir <feature folder>/myrun`
    (out / "sub.csv").write_text("ID,prob")
    before = (out / "manifest.json").read_text()

    # An up-to-date folder is not rebuilt, so nothing is at risk: no refusal.
    assert not build(raw, out).rebuilt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline_module, "write_folder", no_build)  # refused before any work
        for rebuild in (lambda: build(raw, out, force=True), lambda: build(raw, out, max_len=7)):
            with pytest.raises(QinError) as info:
                rebuild()
            message = str(info.value)
            assert message == (
                f"{out}: holds files `qin preprocess` did not write (myrun/, sub.csv); rebuilding "
                "replaces the whole folder and would delete them, so move them out of it first"
            )
    assert (out / "myrun" / "best.pt").read_text() == "weights" and (out / "sub.csv").is_file()
    assert (out / "manifest.json").read_text() == before and leftovers(tmp_path) == []

    # Inside items/ and the split folders only the arrays a build writes are its own; at most 5 named.
    (out / "items" / "notes.txt").write_text("x")
    (out / "train" / "old").mkdir()
    (out / "valid" / "history.npy.bak").write_text("x")
    (out / "test" / "preds.npy").write_text("x")
    (out / ".notes").write_text("x")
    with pytest.raises(QinError) as info:
        build(raw, out, force=True)
    message = str(info.value)
    assert "(.notes, items/notes.txt, myrun/, sub.csv, test/preds.npy and 2 more)" in message
    assert "\n" not in message

    for path in (".notes", "sub.csv", "items/notes.txt", "valid/history.npy.bak", "test/preds.npy"):
        (out / path).unlink()
    for path in ("myrun/best.pt", "myrun", "train/old"):
        (out / path).unlink() if (out / path).is_file() else (out / path).rmdir()
    assert build(raw, out, force=True).rebuilt  # moved out: the rebuild goes ahead
    assert leftovers(tmp_path) == []


def test_a_built_name_of_another_kind_is_foreign(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    elsewhere = tmp_path / "keep.npy"
    np.save(elsewhere, np.arange(7))
    (out / "valid" / "label.npy").unlink()
    (out / "valid" / "label.npy").symlink_to(elsewhere)  # a link: the build never writes one
    with pytest.raises(QinError, match=r"\(valid/label\.npy\); rebuilding"):
        build(raw, out, force=True)
    assert elsewhere.is_file()


# ----------------------------------------------------------------------------- caching


def test_rerun_is_a_noop_until_an_input_or_the_config_changes(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    assert build(raw, out).rebuilt
    manifest = out / "manifest.json"
    mtime = manifest.stat().st_mtime_ns

    again = build(raw, out)
    assert not again.rebuilt and again.feature_dir == out
    assert manifest.stat().st_mtime_ns == mtime

    # touching a file without changing its bytes is still a no-op: the check is by content hash
    os.utime(raw / "train.parquet", ns=(mtime + 10**9, mtime + 10**9))
    assert not build(raw, out).rebuilt

    assert build(raw, out, force=True).rebuilt
    mtime = manifest.stat().st_mtime_ns

    _set("likes_level", 0, 9)(raw)  # a changed input rebuilds
    assert build(raw, out).rebuilt
    assert load_features(out).split("train").likes_level[0] == 10
    assert manifest.stat().st_mtime_ns != mtime

    assert build(raw, out, max_len=7).rebuilt  # a changed config rebuilds
    assert load_features(out).split("train").history.shape == (10, 7)
    assert not build(raw, out, max_len=7).rebuilt

    (out / "valid" / "history.npy").unlink()  # a pruned folder is rebuilt, not trusted
    assert build(raw, out, max_len=7).rebuilt
    assert leftovers(tmp_path) == []


def test_item_info_override(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    alt = tmp_path / "alt_item_info.parquet"
    item_info_frame(seed=7, emb_dtype=pl.Float32).write_parquet(alt)

    default_dir = feature_dir_for(tmp_path / "features", raw, 5, None)
    alt_dir = feature_dir_for(tmp_path / "features", raw, 5, alt)
    assert default_dir.parent == tmp_path / "features"
    assert default_dir.name.startswith(f"{tmp_path.name}-raw-L5-")
    assert alt_dir.name.startswith(default_dir.name + "-ii") and alt_dir != default_dir
    # the same folder name under another parent gets another feature folder
    assert feature_dir_for(tmp_path / "features", tmp_path / "other" / "raw", 5, None) != default_dir
    assert feature_dir_for(tmp_path / "features", raw, 5, alt) == alt_dir  # deterministic

    build(raw, default_dir)
    build(raw, alt_dir, item_info=alt)
    default, override = load_features(default_dir), load_features(alt_dir)
    expected = np.array(item_info_frame(seed=7)["item_emb_d128"].to_list(), dtype=np.float32)
    np.testing.assert_allclose(override.item_emb, expected, rtol=1e-6)
    assert not np.allclose(default.item_emb, override.item_emb)
    assert override.manifest["sources"]["item_info.parquet"]["path"] == str(alt.resolve())
    assert override.manifest["config"]["item_info"] == str(alt.resolve())
    np.testing.assert_array_equal(override.split("train").history, default.split("train").history)

    # switching item table on the same folder rebuilds it
    assert build(raw, default_dir, item_info=alt).rebuilt


@pytest.mark.parametrize("item_info", [False, True])
def test_expected_sources_refuse_changed_inputs_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, item_info: bool
) -> None:
    raw = write_raw(tmp_path)
    alt = tmp_path / "alt.parquet"
    item_info_frame(seed=3).write_parquet(alt)
    override = alt if item_info else None
    out = tmp_path / "f"
    build(raw, out, item_info=override)
    sources = {name: entry["sha256"] for name, entry in load_features(out).manifest["sources"].items()}
    assert not build(raw, out, item_info=override, expected_sources=sources).rebuilt
    assert build(raw, out, item_info=override, force=True, expected_sources=sources).rebuilt
    before = (out / "manifest.json").read_text()

    _set("likes_level", 0, 9)(raw)
    if item_info:
        item_info_frame(seed=4).write_parquet(alt)
    monkeypatch.setattr(pipeline_module, "write_folder", no_build)
    with pytest.raises(QinError) as info:
        build(raw, out, item_info=override, expected_sources=sources)
    changed = "item_info.parquet, train.parquet differ" if item_info else "train.parquet differs"
    message = str(info.value)
    assert message.startswith(f"the raw data changed since the run started ({changed}; raw folder {raw})")
    assert message.endswith("start a new run (the feature folder was left as it is)")
    assert (out / "manifest.json").read_text() == before and leftovers(tmp_path) == []


def test_expected_sources_with_other_file_names_differ(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    sources = {name: entry["sha256"] for name, entry in load_features(out).manifest["sources"].items()}
    missing = {name: digest for name, digest in sources.items() if name != "test.parquet"}
    with pytest.raises(QinError, match=r"\(test\.parquet differs;"):
        build(raw, out, expected_sources=missing)
    with pytest.raises(QinError, match=r"\(extra\.parquet differs;"):
        build(raw, out, expected_sources=sources | {"extra.parquet": "0" * 64})
    with pytest.raises(QinError, match=r"\(valid\.parquet differs;"):
        build(raw, out, expected_sources=sources | {"valid.parquet": ""})


# ----------------------------------------------------------------------------- folder names


def _old_name(raw: Path, max_len: int) -> str:
    """The name `feature_dir_for` always gave (no item_info override)."""
    place = hashlib.sha256(str(raw.resolve()).encode()).hexdigest()[:6]
    return f"{raw.resolve().parent.name}-{raw.name}-L{max_len}-{place}"


def test_a_long_parent_name_is_cut_to_fit_and_builds(tmp_path: Path) -> None:
    parent = tmp_path / ("p" * 240)
    raw = write_raw(parent)
    alt = tmp_path / "alt.parquet"
    item_info_frame(seed=7).write_parquet(alt)
    root = tmp_path / "features"
    for override in (None, alt):
        out = feature_dir_for(root, raw, 5, override)
        assert out.parent == root and len(out.name.encode()) + len(".tmp-4194304") <= 200
        assert out.name.startswith("p" * 100) and "-raw-L5-" in out.name
        assert out == feature_dir_for(root, raw, 5, override)  # deterministic
        assert build(raw, out, item_info=override).rebuilt
        assert load_features(out).split("valid").history.shape == (7, 5)
    # the hash of the full path keeps names unique where the kept part is the same
    twin = write_raw(tmp_path / ("p" * 239 + "q"))
    assert feature_dir_for(root, twin, 5, None) != feature_dir_for(root, raw, 5, None)
    assert leftovers(tmp_path) == []


def test_a_cut_name_counts_utf8_bytes_and_keeps_whole_characters(tmp_path: Path) -> None:
    raw = tmp_path / ("é" * 120) / ("ü" * 100)  # 240 + 200 bytes, 220 characters
    raw.mkdir(parents=True)
    name = feature_dir_for(tmp_path, raw, 64, None).name
    data = name.encode()
    assert len(data) <= 180 and data.decode() == name
    head, _, rest = name.partition("-")
    assert set(head) == {"é"} and rest.startswith("ü") and rest.endswith(_old_name(raw, 64)[-11:])
    assert len(rest.partition("-L64-")[0].encode()) >= 60  # the raw folder's name keeps its share


def test_names_that_fit_never_change(tmp_path: Path) -> None:
    for parent in ("demo", "d" * 100, "é" * 100):
        raw = tmp_path / parent / "MicroLens_1M_x1"
        raw.mkdir(parents=True)
        assert feature_dir_for(tmp_path, raw, 64, None).name == _old_name(raw, 64)
    # the longest name that takes a 7-digit pid's ".tmp-<pid>" within 255 bytes: kept as it is
    fixed = len(f"-raw-L5-{'0' * 6}")
    raw = tmp_path / ("x" * (243 - fixed)) / "raw"
    raw.mkdir(parents=True)
    assert feature_dir_for(tmp_path, raw, 5, None).name == _old_name(raw, 5)
    assert len(_old_name(raw, 5).encode()) == 243
    longer = tmp_path / ("x" * (244 - fixed)) / "raw"
    longer.mkdir(parents=True)
    assert len(feature_dir_for(tmp_path, longer, 5, None).name.encode()) <= 180


def test_feature_dir_of_a_data_config(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    alt = tmp_path / "alt.parquet"
    item_info_frame(seed=7).write_parquet(alt)
    root = tmp_path / "features"
    data = DataConfig(raw_dir=str(raw), features_root=str(root), max_len=7)
    assert feature_dir_of(data) == feature_dir_for(root, raw, 7, None)
    assert feature_dir_of(DataConfig(raw_dir=str(raw), features_root=str(root), max_len=7, item_info="")) == (
        feature_dir_for(root, raw, 7, None)
    )
    with_alt = DataConfig(raw_dir=str(raw), features_root=str(root), max_len=7, item_info=str(alt))
    assert feature_dir_of(with_alt) == feature_dir_for(root, raw, 7, alt) != feature_dir_of(data)


# ----------------------------------------------------------------------------- loading


def test_load_features_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(QinError, match="nope"):
        load_features(missing)
    missing.mkdir()
    with pytest.raises(QinError, match="manifest.json"):
        load_features(missing)
    (missing / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(QinError, match="format_version"):
        load_features(missing)

    raw = write_raw(tmp_path)
    build(raw, tmp_path / "f")
    with pytest.raises(QinError, match="no split 'dev'"):
        load_features(tmp_path / "f").split("dev")


REBUILD = "the feature folder is damaged, rebuild it with `qin preprocess --force`"


@pytest.mark.parametrize(
    ("file", "array", "problem"),
    [
        # a shorter valid array (e.g. from another build): predict failed with IndexError 500 rows on
        (
            "valid/history.npy",
            np.zeros((5, 5), np.int32),
            "5 rows, expected 7 (the manifest's rows for split 'valid')",
        ),
        (
            "valid/label.npy",
            np.zeros(9, np.float32),
            "9 rows, expected 7 (the manifest's rows for split 'valid')",
        ),
        (
            "test/ID.npy",
            np.array(3, np.int64),
            "a scalar (0 dimensions), expected 8 (the manifest's rows for split 'test')",
        ),
        ("train/history.npy", np.zeros((10, 3), np.int32), "3 columns, expected 5 (the manifest's max_len)"),
        ("train/history.npy", np.zeros(10, np.int32), "shape (10,), expected 5 (the manifest's max_len)"),
    ],
)
def test_split_arrays_must_match_the_manifest(
    tmp_path: Path, file: str, array: np.ndarray, problem: str
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    np.save(out / file, array)
    split = file.partition("/")[0]
    features = load_features(out)
    with pytest.raises(QinError) as info:
        features.split(split)
    assert str(info.value) == f"{out / file}: {problem}; {REBUILD}"
    for other in {"train", "valid", "test"} - {split}:
        features.split(other)
    assert build(raw, out).rebuilt  # a folder that would fail so is not up to date
    load_features(out).split(split)


@pytest.mark.parametrize(
    ("file", "array", "problem"),
    [
        (
            "item_emb.npy",
            np.zeros((N_ITEMS - 1, EMB_DIM), np.float32),
            f"{N_ITEMS - 1} rows, expected {N_ITEMS} (the manifest's item_vocab)",
        ),
        (
            "item_tags.npy",
            np.zeros((N_ITEMS + 1, 5), np.int32),
            f"{N_ITEMS + 1} rows, expected {N_ITEMS} (the manifest's item_vocab)",
        ),
        (
            "item_emb.npy",
            np.zeros((N_ITEMS, 64), np.float32),
            f"64 columns, expected {EMB_DIM} (the manifest's mm_dim)",
        ),
    ],
)
def test_item_arrays_must_match_the_manifest(
    tmp_path: Path, file: str, array: np.ndarray, problem: str
) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    build(raw, out)
    np.save(out / "items" / file, array)
    with pytest.raises(QinError) as info:
        load_features(out)
    assert str(info.value) == f"{out / 'items' / file}: {problem}; {REBUILD}"
    assert build(raw, out).rebuilt
    load_features(out)


def test_stale_temp_folders_of_dead_builds_are_removed(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    out = tmp_path / "f"
    ours = tmp_path / f"f.tmp-{os.getpid()}"  # left by an earlier call of this process
    live = tmp_path / f"f.tmp-{os.getppid()}"  # a concurrent build of a live process: keep
    ours.mkdir()
    live.mkdir()
    build(raw, out)
    assert not ours.exists() and live.exists()


def test_a_null_item_in_a_history_message(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    _set("item_seq", 5, [0] * 5 + [3, None, 5])(raw)
    with pytest.raises(QinError) as info:
        build(raw, tmp_path / "f")
    assert str(info.value) == (
        f"{raw / 'train.parquet'}: column 'item_seq' holds a null item id (first bad row 5, 0-based)"
    )


@pytest.mark.parametrize("file", ["train.parquet", "test.parquet", "item_info.parquet"])
@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_an_input_that_is_not_a_regular_file_says_what_it_is(tmp_path: Path, file: str, kind: str) -> None:
    raw = write_raw(tmp_path)
    path = raw / file
    path.unlink()
    if kind == "folder":
        path.mkdir()
        expected = f"{path}: is a folder, not a parquet file"
    else:
        os.mkfifo(path)  # hashing it would block forever: refused before
        expected = f"{path}: is not a regular file (a fifo)"
    with pytest.raises(QinError) as info:
        build(raw, tmp_path / "f")
    assert str(info.value) == expected
    assert not (tmp_path / "f").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["folder", "fifo", "missing"])
def test_an_item_info_override_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    raw = write_raw(tmp_path)
    alt = tmp_path / "alt.parquet"
    expected = {
        "folder": f"{alt}: is a folder, not a parquet file",
        "fifo": f"{alt}: is not a regular file (a fifo)",
        "missing": f"{alt}: file not found",
    }[kind]
    if kind == "folder":
        alt.mkdir()
    elif kind == "fifo":
        os.mkfifo(alt)
    with pytest.raises(QinError) as info:
        feature_dir_for(tmp_path / "features", raw, 5, alt)
    assert str(info.value) == expected
    with pytest.raises(QinError) as info:
        build(raw, tmp_path / "f", item_info=alt)
    assert str(info.value) == expected


def test_a_symlink_to_an_input_is_fine(tmp_path: Path) -> None:
    raw = write_raw(tmp_path)
    (raw / "train.parquet").rename(tmp_path / "elsewhere.parquet")
    (raw / "train.parquet").symlink_to(tmp_path / "elsewhere.parquet")
    assert build(raw, tmp_path / "f").rebuilt
