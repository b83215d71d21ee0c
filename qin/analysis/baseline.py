"""Plain baselines scored on the analysed validation rows, beside the model (`qin.baselines`' ladder).

    popularity  the target item's count among train targets (the feature folder's train/item_id.npy): a
                ranking score, not a probability, so only rank metrics (AUC, GAUC) apply to it
    lr_2        the ladder's 2-feature logistic regression [log(1 + count), cos(target, history mean)],
                fitted on train with `qin.baselines.ladder_features`: a probability

`with_baselines` adds them to the analysis frame as columns of these names; `overall_metrics`, `slice_auc`
and `slice_calibration` then show them beside the model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import polars as pl
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from qin.analysis.load import AnalysisData
from qin.baselines import Baseline, ladder_features, train_counts
from qin.errors import QinError
from qin.features.io import SplitArrays

# Baseline column -> whether it holds probabilities (False: a ranking score, rank metrics only).
BASELINE_COLUMNS: dict[str, bool] = {Baseline.popularity.value: False, Baseline.lr_2.value: True}
LR_TRAIN_ROWS = 200_000  # lr_2 is fitted on at most this many train rows (a random sample beyond)


def popularity_scores(item_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(N,) float64: each row's target item count among train targets (`counts` (V,) from train)."""
    return np.asarray(counts, dtype=np.float64)[np.asarray(item_ids, dtype=np.int64)]


def _sample(split: SplitArrays, rows: np.ndarray) -> SplitArrays:
    """The split restricted to `rows` (sorted indices), as in-memory arrays."""
    def take(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else np.asarray(array[rows])

    # Field by field: each array column taken, the optional ones (None) left None.
    taken: dict[str, Any] = {f.name: take(getattr(split, f.name)) for f in dataclasses.fields(split)}
    return dataclasses.replace(split, **taken)


def lr_2_scores(data: AnalysisData, counts: np.ndarray, train_rows: int = LR_TRAIN_ROWS,
                seed: int = 0) -> np.ndarray:
    """(N,) probabilities of the ladder's lr_2 on the validation rows, fitted on (up to `train_rows` of)
    train exactly as `qin.baselines.fit_ladder` fits it (StandardScaler, then LogisticRegression)."""
    features = data.run.features
    train = features.split("train")
    if train.label is None:
        raise QinError(f"{features.dir}: the train split has no labels; lr_2 cannot be fitted")
    if len(train.item_id) > train_rows:
        chosen = np.sort(np.random.default_rng(seed).choice(len(train.item_id), train_rows, replace=False))
        train = _sample(train, chosen)
    x_train = ladder_features(train, counts, features.item_emb, with_levels=False)  # (n, 2)
    x_valid = ladder_features(features.split("valid"), counts, features.item_emb, with_levels=False)  # (N, 2)
    y_train = np.asarray(train.label, dtype=np.float64)
    if np.unique(y_train).size < 2:
        raise QinError(f"{features.dir}: train labels are all {y_train[0]:g}; lr_2 cannot be fitted")
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    return model.predict_proba(scaler.transform(x_valid))[:, 1]


def with_baselines(data: AnalysisData, lr: bool = True, lr_train_rows: int = LR_TRAIN_ROWS) -> pl.DataFrame:
    """`data.frame` with a `popularity` column (and `lr_2` unless `lr` is False) on the same rows."""
    counts = train_counts(data.run.features)  # (V,)
    valid = data.run.features.split("valid")
    if len(valid.item_id) != data.frame.height:
        raise QinError(f"{data.run.features.dir}: {len(valid.item_id)} validation rows, the analysis frame "
                       f"has {data.frame.height}")
    columns = {Baseline.popularity.value: popularity_scores(valid.item_id, counts)}
    if lr:
        columns[Baseline.lr_2.value] = lr_2_scores(data, counts, lr_train_rows)
    return data.frame.with_columns(**{name: pl.Series(values, dtype=pl.Float64)
                                      for name, values in columns.items()})
