"""Error analysis: each function on hand-made frames, then the notebook end to end on a tiny run."""

from __future__ import annotations

import ast
import json
from importlib.resources import files
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from qin import analysis
from qin.analysis import report
from qin.cli import app
from qin.data import SplitTensors
from qin.errors import QinError
from qin.metrics import gauc
from tests.conftest import ROOT, tiny_config

NOTEBOOK = ROOT / "qin" / "notebooks" / "error_analysis.ipynb"


def predictions(rows: int = 400, seed: int = 0, oracle: bool = False) -> pl.DataFrame:
    """A validation-like frame: labels drawn from p, a noisy score, slicing columns."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, rows)
    label = (rng.uniform(size=rows) < p).astype(np.float64)
    frame = pl.DataFrame({
        "row": np.arange(rows, dtype=np.int64),
        "user_id": rng.integers(0, 50, rows),
        "item_id": rng.integers(1, 30, rows),
        "likes_level": rng.integers(0, 3, rows),
        "views_level": rng.integers(0, 2, rows),
        "history_len": rng.integers(0, 40, rows),
        "train_count": rng.integers(0, 300, rows),
        "repeat": rng.uniform(size=rows) < 0.2,
        "tags": [list(rng.choice([1, 2, 3, 4], size=rng.integers(1, 3), replace=False)) for _ in range(rows)],
        "label": label,
        "prediction": np.clip(p + rng.normal(0, 0.25, rows), 0.0, 1.0),
    }).with_columns(cold=pl.col("train_count") <= analysis.DEFAULT_COLD_MAX)
    return frame.with_columns(p_true=pl.Series(p)) if oracle else frame


# ---------------------------------------------------------------------------------------------------------
# Tables on hand-made data


def test_slice_auc_equals_sklearn_on_each_slice():
    frame = predictions(oracle=True)
    table = analysis.slice_auc(frame, "likes_level")
    assert table["slice"].to_list() == ["0", "1", "2"]
    for level, row in zip(range(3), table.iter_rows(named=True), strict=True):
        part = frame.filter(pl.col("likes_level") == level)
        assert row["rows"] == part.height and row["positives"] == int(part["label"].sum())
        assert row["auc"] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))
        assert row["oracle_auc"] == pytest.approx(roc_auc_score(part["label"], part["p_true"]))
        assert row["mean_prediction"] == pytest.approx(part["prediction"].mean())


def test_slice_auc_buckets_are_left_closed_and_named():
    frame = predictions()
    table = analysis.slice_auc(frame, "history_len", buckets=[1, 10, 20])
    assert table["slice"].to_list() == ["1-9", "10-19", ">=20"]
    assert table["rows"].sum() == frame.filter(pl.col("history_len") >= 1).height  # rows below 1 are dropped
    part = frame.filter((pl.col("history_len") >= 10) & (pl.col("history_len") < 20))
    assert table["auc"][1] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))
    assert analysis.bucket_labels([0, 1, 5]) == ["0", "1-4", ">=5"]
    assert analysis.bucket_labels([0.0, 0.5]) == ["[0, 0.5)", ">=0.5"]
    assert analysis.bucket_labels([0.25, 0.5, 1.0]) == ["[0.25, 0.5)", "[0.5, 1)", ">=1"]
    with pytest.raises(QinError, match="ascending"):
        analysis.slice_auc(frame, "history_len", buckets=[5, 1])
    with pytest.raises(QinError, match="no column"):
        analysis.slice_auc(frame, "missing")


def test_slice_auc_over_a_list_column_counts_a_row_in_each_of_its_slices():
    frame = predictions()
    table = analysis.slice_auc(frame, "tags", top=2)
    counts = frame.explode("tags")["tags"].value_counts().sort(["count", "tags"], descending=[True, False])
    assert table["slice"].to_list() == [str(t) for t in counts["tags"][:2]]
    tag = int(table["slice"][0])
    part = frame.filter(pl.col("tags").list.contains(tag))
    assert table["rows"][0] == part.height
    assert table["auc"][0] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))


def test_slice_with_one_class_has_nan_auc():
    frame = pl.DataFrame({"label": [1.0, 1.0, 0.0, 1.0], "prediction": [0.9, 0.8, 0.1, 0.7],
                          "g": [0, 0, 1, 1]})
    table = analysis.slice_auc(frame, "g")
    assert np.isnan(table["auc"][0]) and table["auc"][1] == 1.0


def test_calibration_table_bins():
    frame = pl.DataFrame({"prediction": [0.05, 0.15, 0.12, 0.95, 1.0, 0.5],
                          "label": [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]})
    table = analysis.calibration_table(frame, bins=10)
    assert table["bin"].to_list() == [0, 1, 5, 9]  # empty bins left out; 1.0 falls in the last bin
    assert table["rows"].to_list() == [1, 2, 1, 2]
    assert table["mean_prediction"][1] == pytest.approx(0.135)
    assert table["label_rate"].to_list() == [0.0, 0.5, 0.0, 1.0]
    assert table["lower"][3] == pytest.approx(0.9) and table["upper"][3] == pytest.approx(1.0)
    quantile = analysis.calibration_table(predictions(rows=1000), bins=4, strategy="quantile")
    assert quantile.height == 4 and quantile["rows"].to_list() == [250, 250, 250, 250]
    with pytest.raises(ValueError):
        analysis.calibration_table(frame, strategy="isotonic")


def test_calibration_table_and_overall_metrics_carry_the_oracle():
    frame = predictions(oracle=True)
    assert "mean_p_true" in analysis.calibration_table(frame).columns
    metrics = {row["metric"]: row for row in analysis.overall_metrics(frame).iter_rows(named=True)}
    assert metrics["AUC"]["model"] == pytest.approx(roc_auc_score(frame["label"], frame["prediction"]))
    assert metrics["AUC"]["oracle"] == pytest.approx(roc_auc_score(frame["label"], frame["p_true"]))
    clipped = np.clip(frame["prediction"].to_numpy(), 1e-7, 1 - 1e-7)
    assert metrics["logloss"]["model"] == pytest.approx(log_loss(frame["label"], clipped))
    assert metrics["rows"]["model"] == frame.height
    without = analysis.overall_metrics(predictions())
    assert without["oracle"].null_count() == without.height == 9
    assert without.columns == ["metric", "model", "oracle"]  # no baseline columns without baselines


def test_overall_metrics_has_the_fields_metrics():
    frame = predictions(oracle=True)
    labels, scores, users = (frame[c].to_numpy() for c in ("label", "prediction", "user_id"))
    metrics = {row["metric"]: row for row in analysis.overall_metrics(frame).iter_rows(named=True)}
    assert metrics["GAUC"]["model"] == pytest.approx(gauc(labels, scores, users))
    assert metrics["GAUC"]["oracle"] == pytest.approx(gauc(labels, frame["p_true"].to_numpy(), users))
    rate = labels.mean()
    entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    assert metrics["NE"]["model"] == pytest.approx(log_loss(labels, clipped) / entropy)
    assert metrics["calibration ratio"]["model"] == pytest.approx(scores.sum() / labels.sum())
    assert metrics["calibration ratio"]["oracle"] == pytest.approx(frame["p_true"].sum() / labels.sum())
    assert np.isnan(analysis.overall_metrics(frame.drop("user_id")).filter(pl.col("metric") == "GAUC")[
        "model"].fill_null(np.nan)[0])  # no users: no GAUC


def test_overall_metrics_show_the_baselines_beside_the_model():
    # popularity by hand: clicked rows have counts {5, 2}, the others {2, 1}; pairs (5>2) (5>1) (2=2) (2>1)
    # give AUC (1 + 1 + 0.5 + 1) / 4 = 0.875. Users: u0 holds rows 0, 1 (5 > 2: AUC 1), u1 rows 2, 3
    # (2 > 1: AUC 1), so GAUC 1.
    counts = np.array([0.0, 5.0, 2.0, 1.0])  # item 0 is padding
    items = np.array([1, 2, 2, 3])
    frame = pl.DataFrame({"user_id": [0, 0, 1, 1], "item_id": items, "label": [1.0, 0.0, 1.0, 0.0],
                          "prediction": [0.5, 0.5, 0.5, 0.5], "lr_2": [0.8, 0.4, 0.6, 0.1],
                          "popularity": analysis.popularity_scores(items, counts)})
    assert frame["popularity"].to_list() == [5.0, 2.0, 2.0, 1.0]
    table = analysis.overall_metrics(frame)
    assert table.columns == ["metric", "model", "oracle", "popularity", "lr_2"]
    metrics = {row["metric"]: row for row in table.iter_rows(named=True)}
    assert metrics["AUC"]["popularity"] == pytest.approx(0.875)
    assert metrics["GAUC"]["popularity"] == pytest.approx(1.0)
    assert metrics["AUC"]["model"] == pytest.approx(0.5)  # a constant score ranks nothing
    # popularity is no probability: it has no logloss, NE, calibration or mean prediction
    for name in ("mean prediction", "logloss", "NE", "calibration ratio", "calibration error (ECE)"):
        assert metrics[name]["popularity"] is None, name
    assert metrics["AUC"]["lr_2"] == pytest.approx(1.0)
    assert metrics["calibration ratio"]["lr_2"] == pytest.approx((0.8 + 0.4 + 0.6 + 0.1) / 2)
    assert metrics["logloss"]["lr_2"] == pytest.approx(log_loss([1, 0, 1, 0], [0.8, 0.4, 0.6, 0.1]))
    slices = analysis.slice_auc(frame, "user_id")
    assert slices["popularity_auc"].to_list() == [1.0, 1.0] and slices["lr_2_auc"].to_list() == [1.0, 1.0]


def test_slice_calibration_is_predicted_over_observed_clicks_per_slice():
    frame = pl.DataFrame({"g": ["a", "a", "a", "b", "b", "c"], "label": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                          "prediction": [0.5, 0.25, 0.75, 0.125, 0.5, 0.5],
                          "p_true": [0.75, 0.25, 0.5, 0.5, 0.5, 0.25], "lr_2": [0.5] * 6})
    table = analysis.slice_calibration(frame, "g")
    assert table["slice"].to_list() == ["a", "b", "c"]
    assert table["rows"].to_list() == [3, 2, 1] and table["clicks"].to_list() == [2, 1, 0]
    assert table["calibration_ratio"][0] == pytest.approx((0.5 + 0.25 + 0.75) / 2)
    assert table["calibration_ratio"][1] == pytest.approx(0.625)
    assert np.isnan(table["calibration_ratio"][2])  # no clicks: undefined
    assert table["mean_prediction"][0] == pytest.approx(0.5)
    assert table["label_rate"][0] == pytest.approx(2 / 3)
    assert table["oracle_calibration_ratio"][0] == pytest.approx(0.75) and table["mean_p_true"][1] == 0.5
    assert table["lr_2_calibration_ratio"].to_list()[:2] == [pytest.approx(0.75), pytest.approx(1.0)]
    by_slice = analysis.calibration_by_slice(predictions())
    assert by_slice.columns[:2] == ["slicing", "slice"]
    history = by_slice.filter(pl.col("slicing") == "history length")
    assert history["rows"].sum() == 400
    frame = predictions()
    part = frame.filter(pl.col("history_len").is_between(5, 9))
    row = history.filter(pl.col("slice") == "5-9")
    assert row["calibration_ratio"][0] == pytest.approx(part["prediction"].sum() / part["label"].sum())


def test_expected_calibration_error():
    # two bins: [0.1]*2 with rate 0.5 (gap 0.4), [0.9]*2 with rate 1.0 (gap 0.1): mean gap 0.25
    assert analysis.expected_calibration_error(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])) \
        == pytest.approx(0.25)
    assert analysis.expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


# Attention over many rows, on a hand-made weight matrix (R = 5 rows, L = 5 slots, most recent last):
WEIGHTS = np.array([[0.0, 0.0, 1.0, 1.0, 2.0],  # shares .25 .25 .5
                    [0.0, 0.0, 0.0, 3.0, 1.0],  # shares .75 .25
                    [0.0, 0.0, 0.0, 0.0, 0.0],  # no history
                    [0.0, 0.0, 0.0, 0.0, 0.0],  # two items, all weights 0 (a ReLU can do that)
                    [0.0, 0.0, 0.0, -1.0, 3.0]])  # DIN scores may be negative: shares .25 .75
MASK = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]],
                dtype=bool)
COSINE = np.array([[0.0, 0.0, 0.1, 0.2, 0.9], [0.0, 0.0, 0.0, 0.5, 0.1], [0.0] * 5, [0.0, 0.0, 0.0, 0.3, 0.3],
                   [0.0, 0.0, 0.0, 0.5, 0.1]])


def test_attention_statistics_on_a_hand_made_weight_matrix():
    stats = analysis.summarize_attention(WEIGHTS, MASK, COSINE, rows=np.array([10, 11, 12, 13, 14]))
    rows = stats.per_row
    assert rows["row"].to_list() == [10, 11, 12, 13, 14] and rows["history_len"].to_list() == [3, 2, 0, 2, 2]
    assert rows["mass"].to_list() == [4.0, 4.0, 0.0, 0.0, 4.0]
    h0 = -(2 * 0.25 * np.log(0.25) + 0.5 * np.log(0.5))
    h1 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert rows["entropy"].to_list() == [pytest.approx(h0), pytest.approx(h1), None, None, pytest.approx(h1)]
    assert rows["relative_entropy"][0] == pytest.approx(h0 / np.log(3))
    assert rows["top1_share"].to_list() == [0.5, 0.75, None, None, 0.75]
    assert rows["top3_share"].to_list() == [1.0, 1.0, None, None, 1.0]
    expected = np.corrcoef([0.25, 0.25, 0.5], [0.1, 0.2, 0.9])[0, 1]
    assert rows["cosine_corr"][0] == pytest.approx(expected)
    assert rows["cosine_corr"][1] == pytest.approx(1.0) and rows["cosine_corr"][4] == pytest.approx(-1.0)
    # per position from the most recent item, over the rows with attention mass (0, 1 and 4)
    recency = stats.by_recency
    assert recency["recency"].to_list() == [0, 1, 2] and recency["rows"].to_list() == [3, 3, 1]
    assert recency["mean_share"].to_list() == [pytest.approx((0.5 + 0.25 + 0.75) / 3),
                                               pytest.approx((0.25 + 0.75 + 0.25) / 3), pytest.approx(0.25)]
    assert recency["mean_weight"].to_list() == [pytest.approx(2.0), pytest.approx(1.0), pytest.approx(1.0)]
    assert recency["uniform_share"][0] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    summary = dict(stats.summary.iter_rows())
    assert summary["rows analysed"] == 5 and summary["rows with a history"] == 4
    assert summary["rows whose weights are all 0"] == 1
    assert summary["mean top-1 share"] == pytest.approx((0.5 + 0.75 + 0.75) / 3)
    assert summary["top-1 share if uniform"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert summary["top-3 share if uniform"] == pytest.approx(1.0)
    shares = [0.25, 0.25, 0.5, 0.75, 0.25, 0.25, 0.75]
    cosines = [0.1, 0.2, 0.9, 0.5, 0.1, 0.5, 0.1]
    assert summary["pooled corr(share, cosine)"] == pytest.approx(np.corrcoef(shares, cosines)[0, 1])
    by_cosine = stats.by_cosine  # ten bins over [-1, 1]: pairs at 0.1 0.2 0.9 0.5 0.1 0.5 0.1
    assert by_cosine["pairs"].sum() == 7
    middle = by_cosine.filter((pl.col("lower") - 0.4).abs() < 1e-9)  # the bin [0.4, 0.6): the two 0.5s
    assert middle["pairs"][0] == 2 and middle["mean_share"][0] == pytest.approx((0.75 + 0.25) / 2)
    assert analysis.recency_positions(np.array([[0, 1, 0, 1, 1]], dtype=bool)).tolist() == [[-1, 2, -1, 1, 0]]


# Two runs side by side: A and B on six rows (exact binary fractions, so the gaps tie exactly).
def two_runs() -> tuple[pl.DataFrame, pl.DataFrame]:
    a = pl.DataFrame({"row": np.arange(6), "user_id": [0, 0, 0, 1, 1, 1], "item_id": [1, 2, 3, 1, 2, 3],
                      "label": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0], "history_len": [1, 1, 9, 9, 1, 9],
                      "prediction": [0.875, 0.25, 0.625, 0.75, 0.25, 0.125]})
    b = a.select("row", "user_id", "item_id", "label").with_columns(
        prediction=pl.Series([0.5, 0.75, 0.5, 0.25, 0.375, 0.125]))
    return a, b


def test_comparison_of_two_prediction_frames():
    a, b = two_runs()
    frame = analysis.compare_frames(a, b)
    assert frame["prediction_b"].to_list() == b["prediction"].to_list()
    overall = {row["metric"]: row for row in analysis.compare_overall(frame).iter_rows(named=True)}
    labels = a["label"].to_numpy()
    assert overall["AUC"]["A"] == pytest.approx(6.5 / 9)  # by hand: 3 + 2 + 1.5 of 9 pairs
    assert overall["AUC"]["B"] == pytest.approx(roc_auc_score(labels, b["prediction"]))
    assert overall["AUC"]["A - B"] == pytest.approx(overall["AUC"]["A"] - overall["AUC"]["B"])
    assert overall["GAUC"]["A"] == pytest.approx(gauc(labels, a["prediction"].to_numpy(), a["user_id"]))
    table = analysis.slice_comparison(frame, "history_len", buckets=[1, 5])
    assert table["slice"].to_list() == ["1-4", ">=5"] and table["rows"].to_list() == [3, 3]
    short = frame.filter(pl.col("history_len") < 5)  # rows 0, 1, 4
    assert table["auc_a"][0] == pytest.approx(roc_auc_score(short["label"], short["prediction"]))
    assert table["auc_b"][0] == pytest.approx(roc_auc_score(short["label"], short["prediction_b"]))
    assert table["auc_a_minus_b"][0] == pytest.approx(table["auc_a"][0] - table["auc_b"][0])
    assert table["logloss_b"][1] == pytest.approx(log_loss([1, 0, 0], [0.5, 0.25, 0.125]))
    # gaps A - B: .375 -.5 .125 .5 -.125 0; who is nearer the label: A A A B B tie
    worst = analysis.disagreements(frame, n=4)
    assert worst["row"].to_list() == [1, 3, 0, 2]  # |gap| largest first, ties by row
    assert worst["gap"].to_list() == [-0.5, 0.5, 0.375, 0.125]
    assert worst["closer"].to_list() == ["A", "B", "A", "A"]
    assert analysis.disagreements(frame, n=6)["closer"].to_list()[-2:] == ["B", "tie"]
    summary = analysis.disagreement_summary(frame, share=0.5)  # the 3 largest gaps: rows 1, 3, 0
    assert summary.select("label", "higher", "rows", "closer").rows() == [
        (1.0, "A", 1, "A"), (0.0, "A", 1, "B"), (0.0, "B", 1, "A")]
    assert summary["share_of_rows"].sum() == pytest.approx(1.0)
    assert summary["mean_prediction_b"].to_list() == [0.5, 0.25, 0.75]


def test_comparison_refuses_other_rows():
    a, b = two_runs()
    with pytest.raises(QinError, match="different validation rows: 6 rows .*run A.* vs 5"):
        analysis.compare_frames(a, b.head(5))
    with pytest.raises(QinError, match="item_id differs on 1 of 6 rows \\(first: row 2\\)"):
        analysis.compare_frames(a, b.with_columns(item_id=pl.Series([1, 2, 9, 1, 2, 3])))
    with pytest.raises(QinError, match="label differs"):
        analysis.compare_frames(a, b.with_columns(label=1.0 - pl.col("label")))
    with pytest.raises(QinError, match="no run to compare with"):
        analysis.load_comparison(None, None)


def test_worst_errors_order():
    frame = pl.DataFrame({"row": [0, 1, 2, 3, 4, 5], "label": [0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
                          "prediction": [0.9, 0.95, 0.9, 0.2, 0.05, 0.6]})
    fp = analysis.worst_errors(frame, "false_positive", n=2)
    assert fp["row"].to_list() == [1, 0]  # highest first; the tie at 0.9 goes to the lower row
    fn = analysis.worst_errors(frame, analysis.ErrorKind.false_negative, n=5)
    assert fn["row"].to_list() == [4, 3, 5]
    with pytest.raises(ValueError):
        analysis.worst_errors(frame, "false_alarm")


def test_example_row_prefers_clicked_new_targets_with_long_histories():
    frame = pl.DataFrame({"row": [0, 1, 2, 3, 4], "label": [1.0, 1.0, 1.0, 0.0, 1.0],
                          "repeat": [True, False, False, False, False], "history_len": [9, 9, 9, 9, 3],
                          "prediction": [0.99, 0.6, 0.8, 0.99, 0.99]})
    assert analysis.example_row(frame) == 2


def test_learning_curves_parse(tmp_path):
    lines = [{"epoch": 2, "step": 20, "lr": 1e-3, "train_loss": 0.5, "valid_auc": 0.7, "valid_logloss": 0.6},
             {"epoch": 1, "step": 10, "lr": 2e-3, "train_loss": 0.6, "valid_auc": 0.6, "valid_logloss": 0.62}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = analysis.learning_curves(tmp_path)
    assert curves["step"].to_list() == [10, 20] and curves["lr"].to_list() == [2e-3, 1e-3]
    assert curves.schema["valid_auc"] == pl.Float64
    with pytest.raises(QinError, match="no metrics log"):
        analysis.learning_curves(tmp_path / "missing")
    # A torn last line (a run killed mid-append) is skipped; a bad line before the end is an error.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_auc": 0.5}\n{"step": 2, "valid_au')
    assert analysis.learning_curves(tmp_path)["step"].to_list() == [1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_auc": 0.5}\nnot json\n{"step": 2}\n')
    with pytest.raises(QinError, match="line 2 is not valid JSON"):
        analysis.learning_curves(tmp_path)


def test_plots_return_figures_with_content():
    frame = predictions(oracle=True)
    slices = {"likes": analysis.slice_auc(frame, "likes_level"),
              "tags": analysis.slice_auc(frame, "tags", top=3)}
    curves = pl.DataFrame({"step": [1, 2], "lr": [1e-3, 5e-4], "train_loss": [0.6, 0.5],
                           "valid_auc": [0.6, 0.7], "valid_logloss": [0.6, 0.55]})
    attention = pl.DataFrame({
        "target_item": [7, 7, 8, 8], "target_title": ["a", "a", None, None], "label": [1.0, 1.0, None, None],
        "prediction": [0.9, 0.9, 0.2, 0.2], "slot": [0, 1, 0, 1], "item_id": [3, 7, 3, 7],
        "title": ["x", "y", "x", "y"], "weight": [0.5, 1.0, 0.0, 0.1],
        "shares_tag": [True, False, False, False], "cosine": [0.1, 1.0, 0.0, 0.2]})
    figures = [
        analysis.plot_slice_auc(slices, overall_auc=0.7),
        analysis.plot_calibration(analysis.calibration_table(frame)),
        analysis.plot_score_histograms(frame),
        analysis.plot_learning_curves(curves),
        analysis.plot_attention(None),
        analysis.plot_attention(attention),
    ]
    for figure in figures:
        assert isinstance(figure, Figure) and figure.axes
    assert len([ax for ax in figures[0].axes if ax.get_visible()]) == 2
    assert len(figures[2].axes) == 2  # model and oracle histograms
    assert len(figures[5].axes) == 2  # one panel per target


def test_new_plots_draw_their_tables():
    frame = predictions(oracle=True).with_columns(popularity=pl.col("train_count").cast(pl.Float64),
                                                  lr_2=pl.lit(0.5))
    slices = analysis.standard_slices(frame, table=analysis.slice_calibration)
    figure = analysis.plot_slice_calibration(slices)
    tops = [patch.get_y() + patch.get_height() for patch in figure.axes[0].patches]  # bars from 1
    assert tops == pytest.approx(slices["history length"]["calibration_ratio"].to_list())
    auc_figure = analysis.plot_slice_auc({"likes": analysis.slice_auc(frame, "likes_level")})
    labels = {collection.get_label() for collection in auc_figure.axes[0].collections}
    assert {"oracle", "popularity baseline", "lr_2 baseline"} <= labels
    stats = analysis.summarize_attention(WEIGHTS, MASK, COSINE)
    attention = analysis.plot_attention_stats(stats)
    heights = [patch.get_height() for patch in attention.axes[0].patches]
    assert heights == pytest.approx(stats.by_recency["mean_share"].to_list())
    assert "no target attention" in analysis.plot_attention_stats(None).axes[0].texts[0].get_text()
    a, b = two_runs()
    compared = analysis.compare_frames(a, b)
    table = pl.concat([analysis.slice_comparison(compared, "history_len", buckets=[1, 5])
                       .select(pl.lit("history").alias("slicing"), pl.all())])
    figure = analysis.plot_comparison(compared, table, ("qin", "din"))
    scatter, bars = figure.axes
    assert sum(len(c.get_offsets()) for c in scatter.collections) == 6  # every row, by label
    assert scatter.get_xlabel() == "A: qin" and scatter.get_ylabel() == "B: din"
    widths = [patch.get_width() for patch in bars.patches]
    assert widths == pytest.approx(np.nan_to_num(table["auc_a_minus_b"].to_numpy()).tolist())


def test_figure_images_are_named_by_cell_tag():
    png = "iVBORw0KGgo="  # base64 of the PNG signature
    cell = nbformat.v4.new_code_cell("x", metadata={"tags": ["figure:calibration"]})
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png}),
                    nbformat.v4.new_output("execute_result", data={"image/png": png}, execution_count=1)]
    untagged = nbformat.v4.new_code_cell("y")
    untagged.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
    images = report._figure_images(nbformat.v4.new_notebook(cells=[cell, untagged]))
    assert [name for name, _ in images] == ["calibration.png", "calibration-2.png"]
    assert images[0][1].startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------------------
# The package


def test_the_package_exports_its_public_api():
    """Every public name of the former single-module qin.analysis, still at `analysis.<name>`."""
    public = {
        "AnalysisData", "BinStrategy", "DEFAULT_COLD_MAX", "ErrorKind", "FIGURE_TAG", "FIG_DPI",
        "HISTORY_BUCKETS",
        "NOTEBOOK", "POPULARITY_BUCKETS", "REPORT_MARK", "Report", "attention_for", "bucket_labels",
        "calibration_table", "example_row", "expected_calibration_error", "explain_errors", "learning_curves",
        "load_analysis", "nearest_items", "overall_metrics", "plot_attention", "plot_calibration",
        "plot_learning_curves", "plot_score_histograms", "plot_slice_auc", "render_report", "slice_auc",
        "standard_slices", "user_targets", "worst_errors",
    }
    added = {  # baselines, calibration per slice, attention over many rows, two runs side by side
        "ATTENTION_ROWS", "AttentionStats", "BASELINE_COLUMNS", "COMPARE_TAG", "Comparison",
        "attention_shares", "attention_stats", "calibration_by_slice", "compare_frames", "compare_overall",
        "compare_slices",
        "disagreement_summary", "disagreements", "load_comparison", "plot_attention_stats", "plot_comparison",
        "plot_slice_calibration", "popularity_scores", "recency_positions", "slice_calibration",
        "slice_comparison", "slice_parts", "summarize_attention", "with_baselines",
    }
    public |= added
    assert set(analysis.__all__) == public
    for name in public:
        assert hasattr(analysis, name), name


def test_no_module_uses_another_modules_private_names():
    modules = {path.stem for path in (ROOT / "qin" / "analysis").glob("*.py")}
    for path in (ROOT / "qin" / "analysis").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qin."):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert not (node.value.id in modules and node.attr.startswith("_")), \
                    f"{path.name} uses {node.value.id}.{node.attr}"


def test_the_notebook_is_package_data():
    assert analysis.NOTEBOOK == files("qin") / "notebooks" / "error_analysis.ipynb"
    assert analysis.NOTEBOOK.is_file() and Path(str(analysis.NOTEBOOK)) == NOTEBOOK


# ---------------------------------------------------------------------------------------------------------
# The committed notebook


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has committed outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {index} has an execution count: clear it"


def test_committed_notebook_holds_analysis_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].count("RUN_DIR =") == 1 and "QIN_RUN_DIR" in code[0]  # the run is set in the first cell
    for source in code:
        assert "def " not in source and "class " not in source and "import torch" not in source
    tags = {tag for cell in nb.cells for tag in cell.metadata.get("tags", [])}
    assert {"figure:slices", "figure:calibration", "figure:attention", "figure:learning_curves",
            "figure:slice_calibration", "figure:attention_stats", "figure:comparison", "compare"} <= tags
    assert "COMPARE_RUN" in code[0] and "QIN_COMPARE_RUN_DIR" in code[0]
    # the comparison is the last section, and all of it is tagged: a report without a second run leaves it out
    first = next(i for i, cell in enumerate(nb.cells) if "compare" in cell.metadata.get("tags", []))
    assert all("compare" in cell.metadata.get("tags", []) for cell in nb.cells[first:])
    assert not any("comparison." in cell.source for cell in nb.cells[:first] if cell.cell_type == "code")


# ---------------------------------------------------------------------------------------------------------
# A run trained on tiny data


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tiny_features, tmp_path_factory) -> Path:
    from qin.features.io import load_features
    from qin.train import fit

    root = tmp_path_factory.mktemp("analysis")
    fit(tiny_config(tiny_data, root, epochs=2), load_features(tiny_features), root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def loaded(tiny_run) -> analysis.AnalysisData:
    return analysis.load_analysis(tiny_run)


def test_load_analysis_joins_item_facts_and_the_oracle(loaded, tiny_data):
    frame = loaded.frame
    valid = pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "valid.parquet")
    train = pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "train.parquet")
    assert frame.height == valid.height and frame["item_id"].to_list() == valid["item_id"].to_list()
    assert loaded.truth_dir == tiny_data / "hidden"
    assert loaded.item_feature == tiny_data / "item_feature.parquet"
    truth = pl.read_parquet(tiny_data / "hidden" / "valid_truth.parquet").sort("row")
    assert np.allclose(frame["p_true"].to_numpy(), truth["p_true"].to_numpy())
    counts = dict(train["item_id"].value_counts().iter_rows())
    assert frame["train_count"].to_list() == [counts.get(i, 0) for i in frame["item_id"]]
    assert frame["cold"].to_list() == [c <= loaded.cold_max for c in frame["train_count"]]
    titles = dict(pl.read_parquet(tiny_data / "item_feature.parquet", columns=["item_id", "item_title"])
                  .rows())
    assert frame["title"][0] == titles[frame["item_id"][0]]
    kept = [[i for i in seq if i != 0][-16:] for seq in valid["item_seq"].to_list()]  # the model's max_len
    expected = [item in seq for item, seq in zip(valid["item_id"], kept, strict=True)]
    assert frame["repeat"].to_list() == expected


def test_nearest_items_match_the_embed_command(loaded, tiny_data):
    from qin.embed import neighbors

    item = int(loaded.frame["item_id"][0])
    ours = analysis.nearest_items(loaded, [item], k=5)
    reference = neighbors(tiny_data / "MicroLens_1M_x1" / "item_info.parquet", None, item, k=5)
    assert ours["item_id"].to_list() == reference["item_id"].to_list()
    assert np.allclose(ours["score"].to_numpy(), reference["score"].to_numpy(), atol=1e-5)
    assert item not in ours["item_id"].to_list() and ours["title"].null_count() == 0


def test_explain_errors_lists_neighbours(loaded):
    table = analysis.explain_errors(loaded, "false_negative", n=4, k=2)
    assert table.height == 4 and (table["prediction"].diff().drop_nulls() >= 0).all()
    assert table["neighbours"].str.count_matches(r" \| ").to_list() == [1, 1, 1, 1]


def test_attention_matches_the_model(loaded):
    import torch

    row = analysis.example_row(loaded.frame)
    targets = analysis.user_targets(loaded, row)
    attention = analysis.attention_for(loaded, row, targets)
    valid = loaded.run.features.split("valid")
    history = np.asarray(valid.history[row])
    assert attention.height == len(targets) * int((history != 0).sum())
    own = attention.filter(pl.col("target_item") == targets[0]).sort("slot")
    assert own["prediction"][0] == pytest.approx(loaded.frame["prediction"][row], abs=1e-5)
    assert own["label"][0] == loaded.frame["label"][row]
    batch = SplitTensors.from_arrays(valid).batch(slice(row, row + 1))
    with torch.no_grad():
        expected = loaded.run.model.attention_weights(batch)[0].numpy()  # (L,)
    assert np.allclose(own["weight"].to_numpy(), expected[history != 0], atol=1e-6)
    assert own["item_id"].to_list() == history[history != 0].tolist()


def test_baselines_on_the_run_are_the_ladders(loaded):
    from qin.baselines import fit_ladder

    frame = analysis.with_baselines(loaded)
    targets = np.load(loaded.run.features.dir / "train" / "item_id.npy")
    counts = np.bincount(targets, minlength=int(frame["item_id"].max()) + 1)
    assert frame["popularity"].to_list() == [float(counts[i]) for i in frame["item_id"]]
    assert frame["popularity"].to_list() == frame["train_count"].cast(pl.Float64).to_list()
    ladder = {score.name.value: score for score in fit_ladder(loaded.run.features)}  # the same fits, scored
    metrics = {row["metric"]: row for row in analysis.overall_metrics(frame).iter_rows(named=True)}
    assert metrics["AUC"]["popularity"] == pytest.approx(ladder["popularity"].auc)
    assert metrics["AUC"]["lr_2"] == pytest.approx(ladder["lr_2"].auc)
    assert metrics["logloss"]["lr_2"] == pytest.approx(ladder["lr_2"].logloss)
    assert analysis.with_baselines(loaded, lr=False).columns[-1] == "popularity"


def test_attention_stats_match_the_model(loaded, monkeypatch):
    import torch

    stats = analysis.attention_stats(loaded, rows=300, seed=1)
    rows = np.array(stats.per_row["row"].to_numpy())  # a writable copy for torch
    assert len(rows) == 300 and (np.diff(rows) > 0).all()  # a sample, in row order
    valid = loaded.run.features.split("valid")
    batch = SplitTensors.from_arrays(valid).batch(torch.as_tensor(rows))
    with torch.no_grad():
        weights = loaded.run.model.attention_weights(batch).numpy()  # (R, L)
    mask = np.asarray(valid.history)[rows] != 0
    magnitude = np.where(mask, np.abs(weights), 0.0)
    live = magnitude.sum(axis=1) > 0
    top1 = magnitude.max(axis=1)[live] / magnitude.sum(axis=1)[live]
    assert stats.per_row.filter(pl.col("mass") > 0)["top1_share"].to_numpy() == pytest.approx(top1, abs=1e-6)
    assert stats.per_row["history_len"].to_list() == mask.sum(axis=1).tolist()
    assert analysis.attention_stats(loaded, rows=10**6).per_row.height == loaded.frame.height  # all rows
    monkeypatch.setattr(loaded.run.model, "attention_weights", lambda batch: None)
    assert analysis.attention_stats(loaded, rows=50) is None  # a model without attention


@pytest.fixture(scope="module")
def other_run(tiny_data, tiny_features, tmp_path_factory) -> Path:
    """A second run on the same features (another seed, one epoch): something to compare with."""
    from qin.features.io import load_features
    from qin.train import fit

    root = tmp_path_factory.mktemp("analysis-other")
    fit(tiny_config(tiny_data, root, epochs=1, seed=11), load_features(tiny_features), root / "other",
        progress=False)
    return root / "other"


def test_load_comparison_scores_the_other_run_on_the_same_rows(loaded, other_run):
    comparison = analysis.load_comparison(loaded, other_run)
    other = analysis.load_analysis(other_run)
    assert comparison.name_a == loaded.run.run_dir.name and comparison.name_b == "other"
    assert comparison.frame["prediction_b"].to_list() == pytest.approx(other.frame["prediction"].to_list())
    assert comparison.frame["prediction"].to_list() == loaded.frame["prediction"].to_list()
    assert comparison.warnings == ()
    same = analysis.load_comparison(loaded, loaded.run.run_dir)  # a run against itself: no disagreement
    assert same.name_a.endswith("(A)") and same.name_b.endswith("(B)")
    assert analysis.compare_overall(same.frame)["A - B"].abs().max() == 0.0


def test_report_executes_the_notebook_headless(tiny_run, other_run):
    result = CliRunner().invoke(app, ["report", "--run", str(tiny_run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    html = tiny_run / "error_analysis.html"
    assert html.is_file() and "Where is the model wrong" in html.read_text()
    executed = nbformat.read(tiny_run / "error_analysis.ipynb", as_version=4)
    errors = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert errors == []
    figures = sorted(p.name for p in (tiny_run / "figures").glob("*.png"))
    assert figures == ["attention.png", "attention_stats.png", "calibration.png", "learning_curves.png",
                       "scores.png", "slice_calibration.png", "slices.png"]
    assert all((tiny_run / "figures" / name).read_bytes().startswith(b"\x89PNG") for name in figures)
    assert executed.metadata["qin"] == {"written_by": "qin report"}  # what lets the next report replace it
    text = html.read_text()
    for section in ("GAUC", "calibration ratio", "Calibration by slice", "Attention over many rows",
                    "popularity", "lr_2", "mean top-1 share"):
        assert section in text, section
    assert "Side by side" not in text  # no second run: the comparison cells are left out
    assert not [cell for cell in executed.cells if "compare" in cell.metadata.get("tags", [])]
    # Again, given the checkpoint and a second run: the earlier executed copy, HTML and figures are the
    # report's own; the comparison section is there this time.
    again = analysis.render_report(tiny_run / "best.pt", compare_run=other_run)
    assert sorted(p.name for p in again.figures) == sorted([*figures, "comparison.png"])
    text = html.read_text()
    assert "Side by side with another run" in text and "Where they disagree most" in text
    executed = nbformat.read(again.notebook, as_version=4)
    compare = [c for c in executed.cells if "compare" in c.metadata.get("tags", []) and c.cell_type == "code"]
    assert len(compare) == 5 and all(cell.outputs for cell in compare)
    assert not [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs
                if o.output_type == "error"]
    printed = "".join(o.get("text", "") for o in compare[0].outputs if o.output_type == "stream")
    assert f"A = {tiny_run.name} (this report's run), B = other" in printed
    assert "auc_a_minus_b" in str(compare[1].outputs[0]["data"])


def test_report_help_and_missing_run(tmp_path):
    runner = CliRunner()
    assert "report" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["report", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "no best.pt" in result.output
