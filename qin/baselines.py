"""The baseline ladder every model is judged against: popularity and small logistic regressions.

These are yardsticks, not submissions: they use a feature computed outside a network (the target item's
count in the training split), which the challenge's Task-2 rules do not allow a model to use. A neural
model that trails them on some data has failed to learn something two numbers already carry.

The rungs, fitted on the train split and scored on any other split of the same feature folder:

    popularity      log(1 + count of the target item among train targets); no fit
    lr_2            logistic regression on [popularity, cos(m_t, mean_j m_hj / |m_hj|)], the cosine
                    between the target's frozen multimodal vector and the mean of its history's unit-norm
                    multimodal vectors (0 for an empty history)
    lr_2_levels     lr_2 plus one-hot likes_level and views_level

Notation: N rows of a split, L history slots, V items, M multimodal width.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from qin.features.io import FeatureSet, SplitArrays
from qin.metrics import auc, logloss


class Baseline(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    popularity = "popularity"
    lr_2 = "lr_2"
    lr_2_levels = "lr_2_levels"


@dataclass(frozen=True)
class BaselineScore:
    name: Baseline
    auc: float
    logloss: float | None  # None for popularity, which is a ranking score, not a probability


def train_counts(features: FeatureSet) -> np.ndarray:
    """How often each item is a train target: (V,) float64 (labels are not read)."""
    targets = np.asarray(features.split("train").item_id, dtype=np.int64)  # (N,)
    return np.bincount(targets, minlength=features.item_emb.shape[0]).astype(np.float64)


def history_cosine(split: SplitArrays, item_emb: np.ndarray) -> np.ndarray:
    """cos(m_t, mean of the unit-norm m_hj over real history slots) per row: (N,) float64; 0 when empty.

    Computed in chunks so a large split never builds an (N, L, M) array at once.
    """
    table = np.asarray(item_emb, dtype=np.float64)  # (V, M)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)  # (V, M); row 0 = 0
    targets = np.asarray(split.item_id, dtype=np.int64)  # (N,)
    history = np.asarray(split.history, dtype=np.int64)  # (N, L), 0 = padding
    out = np.zeros(targets.size)
    for start in range(0, targets.size, 20_000):
        rows = slice(start, start + 20_000)
        pooled = unit[history[rows]].sum(axis=1)  # (n, M): padding rows are zero vectors
        pooled_norm = np.linalg.norm(pooled, axis=1)  # (n,)
        dot = (unit[targets[rows]] * pooled).sum(axis=1)  # (n,)
        out[rows] = np.where(pooled_norm > 0, dot / np.maximum(pooled_norm, 1e-12), 0.0)
    return out


def ladder_features(split: SplitArrays, counts: np.ndarray, item_emb: np.ndarray,
                    with_levels: bool) -> np.ndarray:
    """The logistic regressions' inputs: (N, 2) or (N, 2 + 2 x 11) float64."""
    popularity = np.log1p(counts[np.asarray(split.item_id, dtype=np.int64)])  # (N,)
    columns = [popularity[:, None], history_cosine(split, item_emb)[:, None]]
    if with_levels:
        for level in (split.likes_level, split.views_level):
            columns.append(np.eye(11)[np.asarray(level, dtype=np.int64)])  # (N, 11) one-hot, 0 = padding
    return np.concatenate(columns, axis=1)


def fit_ladder(features: FeatureSet, split: str = "valid",
               labels: np.ndarray | None = None) -> list[BaselineScore]:
    """Every rung fitted on train and scored on `split` (its own labels, or `labels` (N,) for test)."""
    train = features.split("train")
    scored = features.split(split)
    if train.label is None:
        raise ValueError(f"{features.dir}: the train split has no labels")
    truth = np.asarray(scored.label if labels is None else labels, dtype=np.float64)
    if truth is None or truth.size != np.asarray(scored.item_id).size:
        raise ValueError(f"{features.dir}: labels for split {split!r} are missing or of the wrong length")
    counts = train_counts(features)
    results = [BaselineScore(Baseline.popularity,
                             auc(truth, np.log1p(counts[np.asarray(scored.item_id, dtype=np.int64)])), None)]
    y_train = np.asarray(train.label, dtype=np.float64)
    for name, with_levels in ((Baseline.lr_2, False), (Baseline.lr_2_levels, True)):
        x_train = ladder_features(train, counts, features.item_emb, with_levels)
        x_scored = ladder_features(scored, counts, features.item_emb, with_levels)
        scaler = StandardScaler().fit(x_train)
        model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
        probabilities = model.predict_proba(scaler.transform(x_scored))[:, 1]
        results.append(BaselineScore(name, auc(truth, probabilities), logloss(truth, probabilities)))
    return results
