"""Metrics within slices of the validation rows: AUC (model, oracle, baselines) and calibration.

A slicing is a column of the analysis frame (`load.py`): numeric columns are cut into buckets, list
columns (tags) put a row in every slice of its list, other columns give one slice per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import polars as pl

from qin.analysis.baseline import BASELINE_COLUMNS
from qin.errors import QinError
from qin.metrics import auc, calibration_ratio

HISTORY_BUCKETS: tuple[int, ...] = (0, 1, 5, 10, 20, 40, 80)
POPULARITY_BUCKETS: tuple[int, ...] = (0, 1, 6, 21, 101, 501)

SliceTable = Callable[..., pl.DataFrame]  # slice_auc or slice_calibration: (frame, by, buckets, top)


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


def slice_parts(frame: pl.DataFrame, by: str, buckets: Sequence[float] | None = None,
                top: int | None = None) -> list[tuple[object, str, pl.DataFrame]]:
    """(sort key, slice name, rows) of each slice of `by`, in bucket / value order (or the `top` largest
    first); `buckets` and `top` as in `slice_auc`. The slices every slice table is computed over."""
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
    parts = [(key, names[key] if buckets is not None else str(key), part.drop("_key"))
             for (key,), part in data.partition_by("_key", as_dict=True, maintain_order=True).items()]
    if top is not None:  # the largest slices: the real data has ~12k tags
        return sorted(parts, key=lambda p: (-p[2].height, p[0]))[:top]
    return sorted(parts, key=lambda p: (p[0] is not None, p[0]))  # a null value first, as polars sorts


def _baselines(frame: pl.DataFrame, probability: bool | None = None) -> list[str]:
    """The baseline columns the frame has (only the probability ones with probability=True)."""
    return [c for c, is_p in BASELINE_COLUMNS.items() if c in frame.columns and probability in (None, is_p)]


def mean_of(series: pl.Series) -> float:
    """A numeric series' mean (polars types `Series.mean()` as any Python literal, whatever the dtype)."""
    return float(cast(float, series.mean()))


def slice_auc(frame: pl.DataFrame, by: str, buckets: Sequence[float] | None = None, top: int | None = None,
              score: str = "prediction") -> pl.DataFrame:
    """AUC of `score` within each slice of column `by`.

    Args:
        frame: rows with `label`, `score` and `by` (and p_true, baseline columns for their AUCs).
        by: the slicing column; a list column (tags) puts a row in every slice of its list.
        buckets: ascending edges for a numeric column: buckets [e0, e1), ..., [e_last, inf); rows
            below e0 are dropped. None = one slice per distinct value.
        top: keep the `top` largest slices (ordered by rows), e.g. the most frequent tags.
        score: the column to rank by.

    Returns:
        slice (str), rows, positives, label_rate, mean_prediction, auc (NaN with one class), oracle_auc
        when the frame has p_true, and <baseline>_auc for each baseline column it has (popularity, lr_2);
        in bucket / value order (or by rows with `top`).
    """
    extra = {"oracle_auc": "p_true"} if "p_true" in frame.columns else {}
    extra |= {f"{c}_auc": c for c in _baselines(frame)}
    records = []
    for _, name, part in slice_parts(frame, by, buckets, top):
        labels = part["label"].to_numpy()
        record = {"slice": name, "rows": part.height, "positives": int(labels.sum()),
                  "label_rate": float(labels.mean()), "mean_prediction": mean_of(part[score]),
                  "auc": auc(labels, part[score].to_numpy())}
        records.append(record | {out: auc(labels, part[c].to_numpy()) for out, c in extra.items()})
    schema = {"slice": pl.String, "rows": pl.Int64, "positives": pl.Int64, "label_rate": pl.Float64,
              "mean_prediction": pl.Float64, "auc": pl.Float64} | dict.fromkeys(extra, pl.Float64)
    return pl.DataFrame(records, schema=schema)


def slice_calibration(frame: pl.DataFrame, by: str, buckets: Sequence[float] | None = None,
                      top: int | None = None, score: str = "prediction") -> pl.DataFrame:
    """Calibration of `score` within each slice of `by` (slices as in `slice_auc`).

    Returns:
        slice, rows, clicks, label_rate (observed CTR), mean_prediction (predicted CTR),
        calibration_ratio = sum p / sum y (`qin.metrics.calibration_ratio`; NaN without clicks; 1 is
        calibrated, above 1 over-predicts); with p_true: mean_p_true and oracle_calibration_ratio; with an
        lr_2 column: lr_2_calibration_ratio.
    """
    extra = {"oracle_calibration_ratio": "p_true"} if "p_true" in frame.columns else {}
    extra |= {f"{c}_calibration_ratio": c for c in _baselines(frame, probability=True)}
    records = []
    for _, name, part in slice_parts(frame, by, buckets, top):
        labels = part["label"].to_numpy()
        record = {"slice": name, "rows": part.height, "clicks": int(labels.sum()),
                  "label_rate": float(labels.mean()), "mean_prediction": mean_of(part[score]),
                  "calibration_ratio": calibration_ratio(labels, part[score].to_numpy())}
        if "p_true" in part.columns:
            record["mean_p_true"] = mean_of(part["p_true"])
        records.append(record | {out: calibration_ratio(labels, part[c].to_numpy())
                                 for out, c in extra.items()})
    schema = {"slice": pl.String, "rows": pl.Int64, "clicks": pl.Int64, "label_rate": pl.Float64,
              "mean_prediction": pl.Float64, "calibration_ratio": pl.Float64}
    schema |= {"mean_p_true": pl.Float64} if "p_true" in frame.columns else {}
    return pl.DataFrame(records, schema=schema | dict.fromkeys(extra, pl.Float64))


def standard_slices(frame: pl.DataFrame, top_tags: int = 12,
                    table: SliceTable = slice_auc) -> dict[str, pl.DataFrame]:
    """The slices the notebook shows (history length, item popularity, cold items, repeats, levels, tags),
    each as `table(frame, column, buckets, top)`: `slice_auc` (default) or `slice_calibration`."""
    max_history = int(cast(int, frame["history_len"].max() or 0))  # polars types max() as any literal
    history_edges = [e for e in HISTORY_BUCKETS if e <= max_history] or [0]
    return {
        "history length": table(frame, "history_len", history_edges),
        "item rows in train (popularity)": table(frame, "train_count", POPULARITY_BUCKETS),
        "cold item": table(frame, "cold"),
        "target already in the history": table(frame, "repeat"),
        "likes level": table(frame, "likes_level"),
        "views level": table(frame, "views_level"),
        f"tag (the {top_tags} most frequent)": table(frame, "tags", top=top_tags),
    }


def calibration_by_slice(frame: pl.DataFrame, top_tags: int = 12) -> pl.DataFrame:
    """`slice_calibration` of every standard slicing in one frame, with a leading `slicing` column."""
    tables = standard_slices(frame, top_tags, table=slice_calibration)
    return pl.concat([t.select(pl.lit(name).alias("slicing"), pl.all()) for name, t in tables.items()])
