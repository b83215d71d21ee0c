"""Error-analysis tables: overall metrics, calibration, worst errors, neighbours, learning curves.

Each function returns a polars frame (tested on hand-made data); the frames are those of `load.py`.
Slices are in `slices.py`, attention in `attention.py`, baselines in `baseline.py`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import assert_never

import numpy as np
import polars as pl

from qin.analysis.baseline import BASELINE_COLUMNS
from qin.analysis.load import AnalysisData
from qin.errors import QinError
from qin.files import read_jsonl
from qin.metrics import auc, calibration_ratio, gauc, logloss, normalized_entropy


class ErrorKind(enum.StrEnum):
    false_positive = "false_positive"  # label 0, highest predictions first
    false_negative = "false_negative"  # label 1, lowest predictions first


class BinStrategy(enum.StrEnum):
    uniform = "uniform"  # equal-width bins over [0, 1]
    quantile = "quantile"  # equal-count bins


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """sum_b (n_b / N) |mean score_b - label rate_b| over equal-width bins of the score."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if scores.size == 0:
        return float("nan")
    index = np.clip(np.searchsorted(np.linspace(0, 1, bins + 1), scores, side="right") - 1, 0, bins - 1)
    gap = 0.0
    for b in np.unique(index):
        chosen = index == b
        gap += chosen.mean() * abs(scores[chosen].mean() - labels[chosen].mean())
    return float(gap)


def overall_metrics(frame: pl.DataFrame) -> pl.DataFrame:
    """metric | model | oracle | <baselines>: rows, label rate, mean prediction, AUC, GAUC, logloss, NE,
    calibration ratio, ECE of every score the frame has.

    Scores: `prediction` (model), `p_true` (oracle: the column is null without it) and each baseline column
    present (`with_baselines`: popularity, lr_2). GAUC is the per-user AUC weighted by rows
    (`qin.metrics.gauc`; needs user_id, else null); NE is logloss over the entropy of the label rate
    (1 = no better than the rate); the calibration ratio is sum p / sum y (1 = calibrated on the whole).
    popularity is a ranking score, not a probability: it has AUC and GAUC only.
    """
    labels = frame["label"].to_numpy()
    users = frame["user_id"].to_numpy() if "user_id" in frame.columns else None
    probability = {"model": True, "oracle": True, **BASELINE_COLUMNS}
    columns = {"model": "prediction", "oracle": "p_true", **{c: c for c in BASELINE_COLUMNS}}
    names = ["model", "oracle", *[c for c in BASELINE_COLUMNS if c in frame.columns]]
    scores = {name: frame[columns[name]].cast(pl.Float64).to_numpy() for name in names
              if columns[name] in frame.columns}

    def row(fn: Callable[[np.ndarray], float | None], probabilities_only: bool = True) -> list[float | None]:
        return [fn(scores[name]) if name in scores and (probability[name] or not probabilities_only) else None
                for name in names]

    def per_user(s: np.ndarray) -> float | None:
        return gauc(labels, s, users) if users is not None else None

    rows = [
        ("rows", [float(len(labels))] + [None] * (len(names) - 1)),
        ("label rate", [float(labels.mean()) if len(labels) else math.nan] + [None] * (len(names) - 1)),
        ("mean prediction", row(lambda s: float(s.mean()))),
        ("AUC", row(lambda s: auc(labels, s), probabilities_only=False)),
        ("GAUC", row(per_user, probabilities_only=False)),
        ("logloss", row(lambda s: logloss(labels, s))),
        ("NE", row(lambda s: normalized_entropy(labels, s))),
        ("calibration ratio", row(lambda s: calibration_ratio(labels, s))),
        ("calibration error (ECE)", row(lambda s: expected_calibration_error(labels, s))),
    ]
    return pl.DataFrame({"metric": [name for name, _ in rows],
                         **{name: [v[i] for _, v in rows] for i, name in enumerate(names)}},
                        schema={"metric": pl.String, **dict.fromkeys(names, pl.Float64)})


def calibration_table(frame: pl.DataFrame, bins: int = 10, strategy: BinStrategy | str = BinStrategy.uniform,
                      score: str = "prediction") -> pl.DataFrame:
    """Reliability table: bin, lower, upper, rows, mean_prediction, label_rate (+ mean_p_true).

    Empty bins are left out. Uniform bins split [0, 1] into `bins` equal widths (1.0 falls in the
    last); quantile bins hold about the same number of rows each.
    """
    if bins < 1:
        raise QinError(f"bins must be >= 1, got {bins}")
    scores = frame[score].cast(pl.Float64).to_numpy()
    match BinStrategy(strategy):
        case BinStrategy.uniform:
            edges = np.linspace(0.0, 1.0, bins + 1)
        case BinStrategy.quantile:
            quantiles = np.quantile(scores, np.linspace(0.0, 1.0, bins + 1)) if scores.size else [0.0, 1.0]
            edges = np.unique(quantiles)
            if edges.size < 2:  # every score equal: one bin holding them all
                edges = np.array([edges[0], edges[0]]) if edges.size else np.array([0.0, 1.0])
        case other:
            assert_never(other)
    n_bins = len(edges) - 1
    index = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, max(n_bins - 1, 0))
    aggregations = [pl.len().alias("rows"), pl.col(score).mean().alias("mean_prediction"),
                    pl.col("label").cast(pl.Float64).mean().alias("label_rate")]
    if "p_true" in frame.columns:
        aggregations.append(pl.col("p_true").mean().alias("mean_p_true"))
    table = (frame.with_columns(bin=pl.Series(index, dtype=pl.Int64)).group_by("bin").agg(aggregations)
             .sort("bin"))
    bounds = pl.DataFrame({"bin": np.arange(n_bins, dtype=np.int64), "lower": edges[:-1], "upper": edges[1:]})
    table = table.join(bounds, on="bin", how="left").with_columns(pl.col("rows").cast(pl.Int64))
    return table.select("bin", "lower", "upper", "rows", *[c for c in table.columns if c.startswith("mean_")
                                                           or c == "label_rate"])


def worst_errors(frame: pl.DataFrame, kind: ErrorKind | str, n: int = 10) -> pl.DataFrame:
    """The n most confident mistakes: false positives (label 0, highest prediction first) or false
    negatives (label 1, lowest prediction first); ties by row."""
    match ErrorKind(kind):
        case ErrorKind.false_positive:
            negatives = frame.filter(pl.col("label") == 0)
            return negatives.sort(["prediction", "row"], descending=[True, False]).head(n)
        case ErrorKind.false_negative:
            return frame.filter(pl.col("label") == 1).sort(["prediction", "row"]).head(n)
        case other:
            assert_never(other)


def nearest_items(data: AnalysisData, item_ids: Sequence[int], k: int = 5) -> pl.DataFrame:
    """The k nearest items (cosine over the item vectors the model used; faiss) of each query item.

    Returns:
        query_item, rank (1..k), item_id, score (cosine), title, tags, train_count, train_ctr. A query
        whose vector is all zeros (e.g. no content) has no rows.
    """
    from qin.embed import build_index, l2_normalise

    vectors = np.asarray(data.run.features.item_emb, dtype=np.float32)[1:]  # (V-1, M), row i-1 = item i
    queries = [int(i) for i in item_ids if 1 <= int(i) <= len(vectors) and vectors[int(i) - 1].any()]
    schema = {"query_item": pl.Int64, "rank": pl.Int64, "item_id": pl.Int64, "score": pl.Float64}
    if not queries or k < 1:
        found = pl.DataFrame(schema=schema)
    else:
        index = build_index(vectors)
        scores, rows = index.search(np.ascontiguousarray(l2_normalise(vectors[np.array(queries) - 1])),
                                    min(k + 1, len(vectors)))  # (Q, k+1)
        records = []
        for query, score_row, id_row in zip(queries, scores, rows, strict=True):
            kept = [(int(j) + 1, float(s)) for j, s in zip(id_row, score_row, strict=True)
                    if j >= 0 and int(j) + 1 != query][:k]
            records += [(query, rank, item, s) for rank, (item, s) in enumerate(kept, start=1)]
        found = pl.DataFrame(records, schema=schema, orient="row")
    return found.join(data.items, on="item_id", how="left", maintain_order="left")


def explain_errors(data: AnalysisData, kind: ErrorKind | str, n: int = 8, k: int = 3) -> pl.DataFrame:
    """`worst_errors` in readable columns, with each item's k nearest neighbours as one text column."""
    errors = worst_errors(data.frame, kind, n)
    near = nearest_items(data, errors["item_id"].unique().to_list(), k=k)
    name = pl.coalesce(pl.col("title"), pl.col("item_id").cast(pl.String))
    ctr = pl.col("train_ctr").round(2).cast(pl.String).fill_null("-")
    text = (near.with_columns(entry=pl.format("{} (ctr {})", name, ctr))
            .group_by("query_item", maintain_order=True)
            .agg(pl.col("entry").str.join(" | ").alias("neighbours")))
    columns = ["row", "item_id", "prediction", *(["p_true"] if data.has_oracle else []), "title",
               "tags", "train_count", "train_ctr", "history_len", "neighbours"]
    return (errors.join(text, left_on="item_id", right_on="query_item", how="left", maintain_order="left")
            .with_columns(pl.col("prediction").round(4), pl.col("train_ctr").round(3))
            .select(columns))


def learning_curves(run_dir: Path | str) -> pl.DataFrame:
    """The run's metrics.jsonl as a frame: epoch, step, lr, train_loss, valid_auc, valid_logloss, ..."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise QinError(f"no metrics log: {path} (is {run_dir} a run folder?)")
    try:
        records = read_jsonl(path)
    except ValueError as error:
        raise QinError(f"{path}: a line is not JSON ({error})") from error
    if not records:
        raise QinError(f"{path}: no evaluations logged yet")
    frame = pl.DataFrame(records, infer_schema_length=None)
    floats = [c for c in ("lr", "train_loss", "valid_auc", "valid_logloss") if c in frame.columns]
    missing = {"step", "valid_auc"} - set(frame.columns)
    if missing:
        raise QinError(f"{path}: lines lack {', '.join(sorted(missing))}")
    return frame.with_columns(pl.col(floats).cast(pl.Float64), pl.col("step").cast(pl.Int64)).sort("step")
