"""Error-analysis tables: metrics, AUC by slice, calibration, worst errors, neighbours, attention, curves.

Each function returns a polars frame (tested on hand-made data); the frames are those of `load.py`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from pathlib import Path
from typing import assert_never

import numpy as np
import polars as pl

from qin.analysis.load import AnalysisData
from qin.errors import QinError
from qin.metrics import auc, logloss
from qin.predict import one_request
from qin.runs import read_jsonl

HISTORY_BUCKETS: tuple[int, ...] = (0, 1, 5, 10, 20, 40, 80)
POPULARITY_BUCKETS: tuple[int, ...] = (0, 1, 6, 21, 101, 501)


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
