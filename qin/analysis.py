"""Error analysis of a finished run: where the model is wrong, and why.

Plain functions over the per-row validation predictions (`qin.predict.validation_predictions`) and
the feature tables; `notebooks/error_analysis.ipynb` only calls them and shows what they return, and
`render_report` executes that notebook for a run (`qin report`).

    load_analysis(run_dir)          -> AnalysisData: one row per validation row, joined with item facts
    overall_metrics / slice_auc / calibration_table / worst_errors / nearest_items / attention_for /
    learning_curves                 -> polars frames (tested on hand-made data)
    plot_*                          -> matplotlib Figures (no pyplot: nothing global, nothing shown)

Columns of `AnalysisData.frame` (N validation rows): row, user_id, item_id, likes_level, views_level (raw
0..9), history_len, label, prediction, title, tags (list), train_count (rows with this item as target in
train), train_ctr (its click rate there, null when unseen), cold (train_count <= cold_max), and p_true (the
generator's true click probability) on generated data when a truth folder is found; repeat (the target is
already in the row's history).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from qin.errors import QinError, os_error
from qin.metrics import auc, logloss
from qin.predict import LoadedRun, load_run, one_request, validation_predictions
from qin.runs import atomic_write_bytes, atomic_write_text, check_replaceable, folder_mode, read_jsonl

FIG_DPI = 100
HISTORY_BUCKETS: tuple[int, ...] = (0, 1, 5, 10, 20, 40, 80)
POPULARITY_BUCKETS: tuple[int, ...] = (0, 1, 6, 21, 101, 501)
DEFAULT_COLD_MAX = 5  # an item seen as a target at most this often in train counts as cold
NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "error_analysis.ipynb"
FIGURE_TAG = "figure:"  # a code cell tagged "figure:<name>" saves its images as figures/<name>.png


class ErrorKind(enum.StrEnum):
    false_positive = "false_positive"  # label 0, highest predictions first
    false_negative = "false_negative"  # label 1, lowest predictions first


class BinStrategy(enum.StrEnum):
    uniform = "uniform"  # equal-width bins over [0, 1]
    quantile = "quantile"  # equal-count bins


@dataclass(frozen=True)
class AnalysisData:
    """A run's validation rows with everything the analysis joins onto them."""

    run: LoadedRun
    frame: pl.DataFrame  # (N rows) see the module docstring
    items: pl.DataFrame  # (V rows) item_id, title, tags, train_count, train_ctr
    raw_dir: Path
    item_feature: Path | None  # titles come from here; None = no titles
    truth_dir: Path | None  # generator truth (p_true); None on real data
    cold_max: int

    @property
    def has_oracle(self) -> bool:
        return "p_true" in self.frame.columns


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_analysis(run_dir: Path | str, truth_dir: Path | str | None = None, raw_dir: Path | str | None = None,
                  item_feature: Path | str | None = None, feature_dir: Path | str | None = None,
                  device: str = "cpu", cold_max: int = DEFAULT_COLD_MAX) -> AnalysisData:
    """Score the validation split with the run's best model and join item facts onto each row.

    Args:
        run_dir: a run folder (best.pt, config.yaml, metrics.jsonl).
        truth_dir: generator truth folder with valid_truth.parquet; None = `<raw_dir parent>/hidden`
            when it exists (generated data), else no oracle.
        raw_dir: the raw challenge folder; None = the run's `data.raw_dir`.
        item_feature: item_feature.parquet (titles, tags); None = `<raw_dir parent>/item_feature.parquet`
            when it exists.
        feature_dir: feature folder; None = the one the run was trained on.
        device: where to score ("cpu" keeps the analysis off a GPU that may be training).
        cold_max: items with at most this many train rows are flagged cold.
    """
    run = load_run(Path(run_dir), feature_dir=Path(feature_dir) if feature_dir else None, device=device)
    raw = Path(raw_dir) if raw_dir is not None else Path(run.config.data.raw_dir)
    if item_feature is None:
        found = raw.parent / "item_feature.parquet"
        item_feature = found if found.is_file() else None
    if truth_dir is None:
        found = raw.parent / "hidden"
        truth_dir = found if (found / "valid_truth.parquet").is_file() else None
    items = _item_facts(run, Path(item_feature) if item_feature else None)
    frame = validation_predictions(run).join(items, on="item_id", how="left", maintain_order="left")
    valid = run.features.split("valid")
    repeat = (np.asarray(valid.history) == np.asarray(valid.item_id)[:, None]).any(axis=1)  # (N,)
    frame = frame.with_columns(cold=pl.col("train_count") <= cold_max, repeat=pl.Series(repeat))
    if truth_dir is not None:
        frame = frame.with_columns(p_true=_truth(Path(truth_dir), frame.height))
    return AnalysisData(run, frame, items, raw, Path(item_feature) if item_feature else None,
                        Path(truth_dir) if truth_dir else None, cold_max)


def _item_facts(run: LoadedRun, item_feature: Path | None) -> pl.DataFrame:
    """One row per item id 0..V-1: title, tags, train_count, train_ctr."""
    train = run.features.split("train")
    n_items = int(run.features.item_tags.shape[0])
    item_ids = np.asarray(train.item_id, dtype=np.int64)
    counts = np.bincount(item_ids, minlength=n_items)[:n_items]  # (V,)
    labels = np.asarray(train.label, dtype=np.float64)
    clicks = np.bincount(item_ids, weights=labels, minlength=n_items)[:n_items]  # (V,)
    ctr = np.divide(clicks, counts, out=np.full(n_items, np.nan), where=counts > 0)
    tags = np.asarray(run.features.item_tags)  # (V, T), 0 = padding
    items = pl.DataFrame({
        "item_id": np.arange(n_items, dtype=np.int64),
        "tags": [[int(t) for t in row if t != 0] for row in tags],
        "train_count": counts.astype(np.int64),
        "train_ctr": ctr,
    }, schema_overrides={"tags": pl.List(pl.Int64)}).with_columns(pl.col("train_ctr").fill_nan(None))
    titles = pl.DataFrame({"item_id": [], "title": []}, schema={"item_id": pl.Int64, "title": pl.String})
    if item_feature is not None:
        try:
            titles = pl.read_parquet(item_feature, columns=["item_id", "item_title"]).select(
                pl.col("item_id").cast(pl.Int64), pl.col("item_title").cast(pl.String).alias("title"))
        except Exception as error:  # polars raises several types for a missing column or a bad file
            raise QinError(f"{item_feature}: cannot read item_id, item_title ({error})") from error
    items = items.join(titles, on="item_id", how="left", maintain_order="left")
    return items.select("item_id", "title", "tags", "train_count", "train_ctr")


def _truth(truth_dir: Path, rows: int) -> pl.Series:
    path = truth_dir / "valid_truth.parquet"
    if not path.is_file():
        raise QinError(f"truth file not found: {path}")
    truth = pl.read_parquet(path).sort("row")
    if truth.height != rows:
        raise QinError(f"{path}: {truth.height} rows, the validation split has {rows}")
    return truth["p_true"].cast(pl.Float64)


# ---------------------------------------------------------------------------------------------------------
# Tables


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
    """metric | model | oracle (null without p_true): rows, label rate, mean prediction, AUC, logloss, ECE."""
    labels = frame["label"].to_numpy()
    scores = {"model": frame["prediction"].to_numpy()}
    if "p_true" in frame.columns:
        scores["oracle"] = frame["p_true"].to_numpy()

    def column(fn) -> list[float | None]:
        return [fn(scores[name]) if name in scores else None for name in ("model", "oracle")]

    rows = [
        ("rows", [float(len(labels)), None]),
        ("label rate", [float(labels.mean()) if len(labels) else math.nan, None]),
        ("mean prediction", column(lambda s: float(s.mean()))),
        ("AUC", column(lambda s: auc(labels, s))),
        ("logloss", column(lambda s: logloss(labels, s))),
        ("calibration error (ECE)", column(lambda s: expected_calibration_error(labels, s))),
    ]
    return pl.DataFrame({"metric": [name for name, _ in rows], "model": [v[0] for _, v in rows],
                         "oracle": [v[1] for _, v in rows]}, schema={"metric": pl.String, "model": pl.Float64,
                                                                     "oracle": pl.Float64})


def bucket_labels(edges: Sequence[float]) -> list[str]:
    """Names of the buckets [e0, e1), [e1, e2), ..., [e_last, inf) of `slice_auc(buckets=edges)`."""
    integer = all(float(e).is_integer() for e in edges)
    labels = []
    for lo, hi in zip(edges, [*edges[1:], None], strict=True):
        if hi is None:
            labels.append(f">={lo:g}")
        elif integer and hi - lo == 1:
            labels.append(f"{lo:g}")
        elif integer:
            labels.append(f"{lo:g}-{hi - 1:g}")
        else:
            labels.append(f"[{lo:g}, {hi:g})")
    return labels


def slice_auc(frame: pl.DataFrame, by: str, buckets: Sequence[float] | None = None, top: int | None = None,
              score: str = "prediction") -> pl.DataFrame:
    """AUC of `score` within each slice of column `by`.

    Args:
        frame: rows with `label`, `score` and `by` (and p_true for the oracle column).
        by: the slicing column; a list column (tags) puts a row in every slice of its list.
        buckets: ascending edges for a numeric column: buckets [e0, e1), ..., [e_last, inf); rows
            below e0 are dropped. None = one slice per distinct value.
        top: keep the `top` largest slices (ordered by rows), e.g. the most frequent tags.
        score: the column to rank by.

    Returns:
        slice (str), rows, positives, label_rate, mean_prediction, auc (NaN with one class), and
        oracle_auc when the frame has p_true; in bucket / value order (or by rows with `top`).
    """
    if by not in frame.columns:
        raise QinError(f"no column {by!r} to slice by (have: {', '.join(frame.columns)})")
    data = frame.explode(by).drop_nulls(by) if isinstance(frame.schema[by], pl.List) else frame
    if buckets is not None:
        edges = np.asarray(buckets, dtype=np.float64)
        if edges.size == 0 or np.any(np.diff(edges) <= 0):
            raise QinError(f"buckets must be non-empty and strictly ascending, got {list(buckets)}")
        index = np.searchsorted(edges, data[by].cast(pl.Float64).to_numpy(), side="right") - 1
        data = data.with_columns(_key=pl.Series(index, dtype=pl.Int64)).filter(pl.col("_key") >= 0)
        names = bucket_labels(list(buckets))
    else:
        data = data.with_columns(_key=pl.col(by))
    if top is not None:  # keep only the largest slices before scoring: the real data has ~12k tags
        largest = data["_key"].value_counts().sort(["count", "_key"], descending=[True, False]).head(top)
        data = data.filter(pl.col("_key").is_in(largest["_key"].implode()))
    has_oracle = "p_true" in data.columns
    records = []
    for (key,), part in data.partition_by("_key", as_dict=True, maintain_order=True).items():
        labels = part["label"].to_numpy()
        record = {"_key": key, "slice": names[key] if buckets is not None else str(key), "rows": part.height,
                  "positives": int(labels.sum()), "label_rate": float(labels.mean()),
                  "mean_prediction": float(part[score].mean()), "auc": auc(labels, part[score].to_numpy())}
        if has_oracle:
            record["oracle_auc"] = auc(labels, part["p_true"].to_numpy())
        records.append(record)
    schema = {"_key": data.schema["_key"], "slice": pl.String, "rows": pl.Int64, "positives": pl.Int64,
              "label_rate": pl.Float64, "mean_prediction": pl.Float64, "auc": pl.Float64}
    if has_oracle:
        schema["oracle_auc"] = pl.Float64
    result = pl.DataFrame(records, schema=schema)
    if top is not None:
        return result.sort(["rows", "_key"], descending=[True, False]).head(top).drop("_key")
    return result.sort("_key").drop("_key")


def standard_slices(frame: pl.DataFrame, top_tags: int = 12) -> dict[str, pl.DataFrame]:
    """The slices the notebook shows: history length, item popularity, cold items, levels, tags."""
    max_history = int(frame["history_len"].max() or 0)
    history_edges = [e for e in HISTORY_BUCKETS if e <= max_history] or [0]
    return {
        "history length": slice_auc(frame, "history_len", history_edges),
        "item rows in train (popularity)": slice_auc(frame, "train_count", POPULARITY_BUCKETS),
        "cold item": slice_auc(frame, "cold"),
        "target already in the history": slice_auc(frame, "repeat"),
        "likes level": slice_auc(frame, "likes_level"),
        "views level": slice_auc(frame, "views_level"),
        f"tag (the {top_tags} most frequent)": slice_auc(frame, "tags", top=top_tags),
    }


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


def example_row(frame: pl.DataFrame) -> int:
    """A readable attention example: a clicked row whose target is new to the history (so attention has to
    match by content, not by id), with the longest history, the one the model is surest of."""
    pool = frame
    for condition in (pl.col("label") == 1, ~pl.col("repeat") if "repeat" in frame.columns else pl.lit(True)):
        narrower = pool.filter(condition)
        pool = narrower if narrower.height else pool
    if pool.height == 0:
        raise QinError("the validation frame is empty")
    longest = pool.filter(pl.col("history_len") == pool["history_len"].max())
    return int(longest.sort(["prediction", "row"], descending=[True, False])["row"][0])


def user_targets(data: AnalysisData, row: int, limit: int = 4) -> list[int]:
    """The target item of `row` first, then the user's other validation candidates (up to `limit`)."""
    frame = data.frame
    user, item = frame["user_id"][row], int(frame["item_id"][row])
    others = frame.filter((pl.col("user_id") == user) & (pl.col("item_id") != item))["item_id"].unique(
        maintain_order=True).to_list()
    return [item, *others][:limit]


def attention_for(data: AnalysisData, row: int, targets: Sequence[int] | None = None) -> pl.DataFrame | None:
    """Attention weight of each history item of validation `row`, for its target or chosen targets.

    Returns:
        One row per (target, history item): target_item, target_title, label (the user's validation label
        for that item, null when the user has no such row), prediction (the model's, for this history),
        slot (0 = oldest), item_id, title, weight, shares_tag (the history item has a tag of the target),
        cosine (of the two item vectors). None for a model without attention (e.g. qin_no_asta).
    """
    import torch

    from qin.batch import Batch

    valid = data.run.features.split("valid")
    if not 0 <= row < len(valid.item_id):
        raise QinError(f"row {row} is not in the validation split (0..{len(valid.item_id) - 1})")
    chosen = [int(valid.item_id[row])] if targets is None else [int(t) for t in targets]
    history = np.asarray(valid.history[row], dtype=np.int64)  # (L,)
    likes = np.full(len(chosen), int(valid.likes_level[row]), dtype=np.int64)  # encoded (level + 1)
    views = np.full(len(chosen), int(valid.views_level[row]), dtype=np.int64)
    batch = Batch(target_item=torch.as_tensor(chosen, dtype=torch.long),
                  history=torch.as_tensor(history).view(1, -1).expand(len(chosen), -1),  # (T, L)
                  likes_level=torch.as_tensor(likes), views_level=torch.as_tensor(views)).to(data.run.device)
    with torch.no_grad():
        weights = data.run.model.attention_weights(batch)  # (T, L) or None
    if weights is None:
        return None
    weights = weights.float().cpu().numpy()
    predictions = one_request(data.run, history, np.array(chosen), likes, views)  # (T,)
    keep = np.flatnonzero(history != 0)  # real slots, oldest first
    vectors = np.asarray(data.run.features.item_emb, dtype=np.float64)
    item_tags = zip(data.items["item_id"].to_list(), data.items["tags"].to_list(), strict=True)
    tag_sets = {int(i): set(t) for i, t in item_tags}
    user = data.frame["user_id"][row]
    labels = dict(data.frame.filter(pl.col("user_id") == user).select("item_id", "label").iter_rows())
    records = []
    for t, target in enumerate(chosen):
        for slot, position in enumerate(keep):
            item = int(history[position])
            records.append((target, labels.get(target), float(predictions[t]), slot, item,
                            float(weights[t, position]),
                            bool(tag_sets.get(item, set()) & tag_sets.get(target, set())),
                            _cosine(vectors[target], vectors[item])))
    frame = pl.DataFrame(records, orient="row", schema={
        "target_item": pl.Int64, "label": pl.Float64, "prediction": pl.Float64, "slot": pl.Int64,
        "item_id": pl.Int64, "weight": pl.Float64, "shares_tag": pl.Boolean, "cosine": pl.Float64})
    titles = data.items.select("item_id", "title")
    frame = frame.join(titles, on="item_id", how="left", maintain_order="left").join(
        titles.rename({"item_id": "target_item", "title": "target_title"}), on="target_item", how="left",
        maintain_order="left")
    return frame.select("target_item", "target_title", "label", "prediction", "slot", "item_id", "title",
                        "weight", "shares_tag", "cosine")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


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


# ---------------------------------------------------------------------------------------------------------
# Figures (matplotlib.figure.Figure, not pyplot: a notebook shows what a cell returns, a script can savefig)


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=FIG_DPI, layout="constrained")


def plot_slice_auc(slices: Mapping[str, pl.DataFrame], overall_auc: float | None = None,
                   columns: int = 3) -> Figure:
    """One bar panel per slicing: AUC per slice (oracle as black ticks), rows under each label."""
    rows = math.ceil(len(slices) / columns)
    fig = _figure(4.6 * columns, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (title, table) in zip(axes, slices.items(), strict=False):
        x = np.arange(table.height)
        values = table["auc"].to_numpy()
        ax.bar(x, np.nan_to_num(values, nan=0.0), color="tab:blue", alpha=0.8, label="model")
        lows = [np.nanmin(values)] if np.isfinite(values).any() else [0.5]
        if "oracle_auc" in table.columns:
            oracle = table["oracle_auc"].to_numpy()
            ax.scatter(x, oracle, marker="_", s=300, color="black", zorder=3, label="oracle")
            lows.append(np.nanmin(oracle) if np.isfinite(oracle).any() else 0.5)
        if overall_auc is not None:
            ax.axhline(overall_auc, color="tab:red", linestyle="--", linewidth=1, label="all rows")
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        ax.set_xticks(x, [f"{s}\n{n}" for s, n in zip(table["slice"], table["rows"], strict=True)],
                      fontsize=7, rotation=0 if table.height <= 8 else 45)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("AUC")
    for ax in axes[len(slices):]:
        ax.set_visible(False)
    if len(slices):
        axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("AUC by slice (label, then rows)", fontsize=11)
    return fig


def plot_calibration(table: pl.DataFrame, title: str = "Reliability diagram") -> Figure:
    """Label rate against mean prediction per bin (marker area ~ rows), and the rows per bin."""
    fig = _figure(5.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    predicted, observed, rows = (table[c].to_numpy() for c in ("mean_prediction", "label_rate", "rows"))
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    top.plot(predicted, observed, marker="o", color="tab:blue", label="model: observed click rate")
    top.scatter(predicted, observed, s=20 + 300 * rows / max(rows.max(), 1), color="tab:blue", alpha=0.3)
    if "mean_p_true" in table.columns:
        top.plot(predicted, table["mean_p_true"].to_numpy(), marker="x", color="black", linestyle="--",
                 label="true click probability (oracle)")
    top.set_ylabel("click rate")
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title, fontsize=11)
    widths = (table["upper"] - table["lower"]).to_numpy()
    bottom.bar(table["lower"].to_numpy(), rows, width=widths, align="edge", color="tab:grey",
               edgecolor="white")
    bottom.set_ylabel("rows")
    bottom.set_xlabel("predicted click probability")
    bottom.set_xlim(0, 1)
    return fig


def plot_score_histograms(frame: pl.DataFrame, bins: int = 40) -> Figure:
    """Prediction histograms of clicked and non-clicked rows (and of p_true, when known)."""
    columns = [("prediction", "model prediction")] + ([("p_true", "true probability (oracle)")]
                                                       if "p_true" in frame.columns else [])
    fig = _figure(5.0 * len(columns), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(columns), squeeze=False)).ravel()
    edges = np.linspace(0, 1, bins + 1)
    labels = frame["label"].to_numpy()
    for ax, (column, title) in zip(axes, columns, strict=True):
        scores = frame[column].to_numpy()
        for value, name, color in ((0, "not clicked", "tab:blue"), (1, "clicked", "tab:orange")):
            chosen = scores[labels == value]
            ax.hist(chosen, bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{name} ({chosen.size} rows)")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("probability")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return fig


def _short(text: str | None, fallback: str, width: int = 28) -> str:
    text = fallback if text is None or text == "" else text
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_attention(attention: pl.DataFrame | None) -> Figure:
    """Attention weight of each history item (rows, most recent at the bottom), one panel per target.

    Orange bars: the history item shares a tag with the target; red: it is the target itself.
    """
    if attention is None or attention.height == 0:
        fig = _figure(5, 1.5)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "this model has no target attention", ha="center", va="center")
        ax.set_axis_off()
        return fig
    targets = attention["target_item"].unique(maintain_order=True).to_list()
    first = attention.filter(pl.col("target_item") == targets[0]).sort("slot")
    slots = first.height
    fig = _figure(2.2 + 2.6 * len(targets), 1.2 + 0.22 * slots)
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharex=True, sharey=True, squeeze=False)).ravel()
    names = [f"{_short(t, str(i))} · {i}" for t, i in zip(first["title"], first["item_id"], strict=True)]
    for ax, target in zip(axes, targets, strict=True):
        part = attention.filter(pl.col("target_item") == target).sort("slot")
        colors = np.where(part["shares_tag"].to_numpy(), "tab:orange", "tab:blue")
        colors[part["item_id"].to_numpy() == target] = "tab:red"
        ax.barh(part["slot"].to_numpy(), part["weight"].to_numpy(), color=colors)
        label = part["label"][0]
        outcome = "" if label is None else (" clicked" if label == 1 else " not clicked")
        ax.set_title(f"target: {_short(part['target_title'][0], str(target), 22)}\n"
                     f"p={part['prediction'][0]:.3f}{outcome}", fontsize=8)
        ax.set_xlabel("attention weight", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(np.arange(slots), names, fontsize=7)
    axes[0].invert_yaxis()  # oldest at the top, most recent at the bottom
    axes[0].set_ylabel("history (oldest at the top)", fontsize=8)
    fig.suptitle("ASTA attention over one user's history (orange: shares a tag with the target; red: is the "
                 "target)", fontsize=10)
    return fig


def plot_learning_curves(curves: pl.DataFrame) -> Figure:
    """Train loss and valid logloss, valid AUC (best marked), and learning rate, against the step."""
    fig = _figure(13, 3.4)
    loss_ax, auc_ax, lr_ax = fig.subplots(1, 3)
    steps = curves["step"].to_numpy()
    if "train_loss" in curves.columns:
        loss_ax.plot(steps, curves["train_loss"].to_numpy(), marker="o", label="train loss")
    if "valid_logloss" in curves.columns:
        loss_ax.plot(steps, curves["valid_logloss"].to_numpy(), marker="o", label="valid logloss")
    loss_ax.set_title("loss", fontsize=11)
    loss_ax.legend(fontsize=8)
    values = curves["valid_auc"].to_numpy()
    auc_ax.plot(steps, values, marker="o", color="tab:green")
    if np.isfinite(values).any():
        best = int(np.nanargmax(values))
        auc_ax.scatter([steps[best]], [values[best]], s=120, facecolors="none", edgecolors="tab:red",
                       label=f"best {values[best]:.4f} (step {steps[best]})", zorder=3)
        auc_ax.legend(fontsize=8)
    auc_ax.set_title("valid AUC", fontsize=11)
    if "lr" in curves.columns:
        lr_ax.plot(steps, curves["lr"].to_numpy(), marker="o", color="tab:purple")
        lr_ax.set_yscale("log")
    lr_ax.set_title("learning rate", fontsize=11)
    for ax in (loss_ax, auc_ax, lr_ax):
        ax.set_xlabel("step")
    return fig


# ---------------------------------------------------------------------------------------------------------
# The report: execute the notebook for a run


@dataclass(frozen=True)
class Report:
    html: Path
    notebook: Path  # the executed copy
    figures: list[Path]
    seconds: float


def render_report(run_dir: Path | str, out_html: Path | str | None = None,
                  truth_dir: Path | str | None = None, feature_dir: Path | str | None = None,
                  notebook: Path | str | None = None, timeout: int = 1800) -> Report:
    """Execute the error-analysis notebook for `run_dir` and write it out with its figures.

    Writes (each atomically) `<run_dir>/error_analysis.ipynb` (executed, marked as written by qin in its
    metadata; also when a cell fails, for inspection), `out_html` (default `<run_dir>/error_analysis.html`)
    and `<run_dir>/figures/<name>.png` for every image of a cell tagged `figure:<name>` (the folder is
    replaced as a whole). The kernel is this interpreter's ipykernel, started in the current folder (a
    run's paths are relative to it) with QIN_RUN_DIR (and QIN_TRUTH_DIR, QIN_FEATURE_DIR when given) in
    its environment.

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
    nb = nbformat.read(source, as_version=4)
    executed = run_dir / "error_analysis.ipynb"
    _check_executed_copy(executed, nb)
    _check_figures_folder(figures_dir, _figure_names(nb))
    for folder in _output_folders(run_dir, figures_dir, html):
        _check_writable(folder)

    nb.metadata["qin"] = dict(REPORT_MARK)  # lets the next report replace this executed copy
    env = {**os.environ, "QIN_RUN_DIR": str(run_dir.resolve()),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    for name, value in (("QIN_TRUTH_DIR", truth_dir), ("QIN_FEATURE_DIR", feature_dir)):
        env.pop(name, None)
        if value is not None:
            env[name] = str(Path(value).resolve())
    client = _notebook_client_class()(nb, kernel_manager_class=_this_python_kernel_manager(), timeout=timeout,
                                      resources={"metadata": {"path": str(Path.cwd())}})
    # The kernel's own stderr (start-up warnings, a crash before it can report) goes to a scratch file:
    # cell output reaches the notebook over the kernel protocol, and a crash is quoted in the error.
    with tempfile.TemporaryFile() as kernel_log:
        try:
            _execute(client, env=env, stderr=kernel_log)
        except CellExecutionError as error:
            atomic_write_text(executed, nbformat.writes(nb))
            raise QinError(f"{source.name} failed for {run_dir} (executed copy: {executed}): "
                           f"{getattr(error, 'ename', '')}: {getattr(error, 'evalue', error)}") from error
        except (DeadKernelError, RuntimeError) as error:
            kernel_log.seek(0)
            tail = kernel_log.read().decode(errors="replace")[-2000:]
            raise QinError(f"the notebook kernel failed ({error}); its log ends with:\n{tail}") from error
    atomic_write_text(executed, nbformat.writes(nb))
    body, _ = HTMLExporter().from_notebook_node(nb, resources={"metadata": {"name": NOTEBOOK.stem}})
    atomic_write_text(html, body)
    figures = _write_figures(nb, figures_dir)
    return Report(html=html, notebook=executed, figures=figures, seconds=time.perf_counter() - started)


REPORT_MARK = {"written_by": "qin report"}  # metadata["qin"] of every executed copy `qin report` writes


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
    return f"<title>{NOTEBOOK.stem}</title>" in head


def _is_report_notebook(path: Path, source) -> bool:
    """An executed copy `qin report` wrote: marked so in its metadata, or (written before the mark) with
    the same cells as the source notebook."""
    import nbformat

    try:
        existing = nbformat.read(path, as_version=4)
    except Exception:  # not JSON, not a notebook, not UTF-8: nbformat raises several types
        return False
    mark = existing.get("metadata", {}).get("qin")
    if isinstance(mark, Mapping) and mark.get("written_by") == REPORT_MARK["written_by"]:
        return True
    sources = [cell.get("source") for cell in existing.get("cells", [])]
    return sources == [cell.source for cell in source.cells]


def _check_executed_copy(path: Path, source) -> None:
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


def _figure_name(cell) -> str | None:
    """<name> of a code cell tagged figure:<name> (the first such tag); None for any other cell."""
    tags = cell.get("metadata", {}).get("tags", [])
    names = [t[len(FIGURE_TAG):] for t in tags if t.startswith(FIGURE_TAG)]
    return names[0] if cell.cell_type == "code" and names else None


def _figure_names(nb) -> set[str]:
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


def _this_python_kernel_manager() -> type:
    """A kernel manager class that starts ipykernel with *this* interpreter, whatever kernelspecs are
    installed (a user-level `python3` spec may point at another Python, without qin)."""
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager

    class ThisPythonKernelManager(AsyncKernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3 (qin)", language="python")

    return ThisPythonKernelManager


def _notebook_client_class() -> type:
    """nbclient's NotebookClient without its own SIGINT/SIGTERM handlers.

    Those shut the kernel down under the running cell, which then fails with DeadKernelError and the
    context exit with an AssertionError (a 68-line traceback on Ctrl-C); `_execute` owns Ctrl-C instead.
    The kernel is always shut down on the way out, also when the start is interrupted, and shutting it
    down twice is harmless.
    """
    from nbclient import NotebookClient

    class QuietClient(NotebookClient):
        @asynccontextmanager
        async def async_setup_kernel(self, **kwargs):
            kwargs.pop("cleanup_kc", None)  # this client always owns its kernel
            if self.km is None:
                self.km = self.create_kernel_manager()
            try:
                if not self.km.has_kernel:
                    await self.async_start_new_kernel(**kwargs)
                if self.kc is None:
                    await self.async_start_new_kernel_client()
                yield
            finally:
                await self._async_cleanup_kernel()

        async def _async_cleanup_kernel(self) -> None:
            if self.km is not None:
                await super()._async_cleanup_kernel()

    return QuietClient


def _execute(client, **kwargs) -> None:
    """`client.execute(**kwargs)` on a fresh event loop, where Ctrl-C kills the kernel and raises
    KeyboardInterrupt (no DeadKernelError, no traceback of the cleanup)."""
    loop = asyncio.new_event_loop()
    task = loop.create_task(client.async_execute(**kwargs))
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:  # a second Ctrl-C while the kernel is being killed changes nothing
            interrupted = True
            client.shutdown_kernel = "immediate"  # kill it: a busy kernel would not answer a shutdown request
            task.cancel()

    # Only where Ctrl-C would raise KeyboardInterrupt: not where SIGINT is ignored (nohup, a background job)
    # or handled by the caller; not on Windows or off the main thread (no signal handlers there).
    handling = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if handling:
        try:
            loop.add_signal_handler(signal.SIGINT, interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            handling = False
    try:
        try:
            loop.run_until_complete(task)
        except BaseException:
            if not task.done():  # a KeyboardInterrupt raised out of the loop: stop the kernel before leaving
                interrupt()
                with contextlib.suppress(BaseException):
                    loop.run_until_complete(task)
            raise
        finally:
            _cancel_pending(loop)
            if handling:
                loop.remove_signal_handler(signal.SIGINT)  # restores default_int_handler
            loop.close()
    except BaseException:
        if interrupted:
            raise KeyboardInterrupt from None  # the DeadKernelError of the killed kernel is no news
        raise
    if interrupted:
        raise KeyboardInterrupt


def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what nbclient left running (its kernel-alive poll outlives a killed cell)."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


def _figure_images(nb) -> list[tuple[str, bytes]]:
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


def _write_figures(nb, folder: Path) -> list[Path]:
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
