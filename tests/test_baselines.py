"""The baseline ladder: hand-computed features, and a fit that finds a planted signal."""

from __future__ import annotations

import numpy as np
import pytest

from qin.baselines import Baseline, fit_ladder, history_cosine, ladder_features, train_counts
from qin.features.io import SplitArrays, load_features
from qin.metrics import auc


def split_of(targets: list[int], history: list[list[int]], levels: list[int]) -> SplitArrays:
    n = len(targets)
    return SplitArrays(item_id=np.array(targets, dtype=np.int32),
                       history=np.array(history, dtype=np.int32), likes_level=np.array(levels, dtype=np.int8),
                       views_level=np.array(levels, dtype=np.int8),
                       user_id=np.arange(n), label=np.zeros(n, dtype=np.float32), ids=None)


def test_history_cosine_by_hand() -> None:
    item_emb = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # row 0 = padding
    split = split_of([3, 1, 2], [[0, 1, 2], [0, 0, 1], [0, 0, 0]], [1, 2, 3])
    # row 0: unit history vectors (1,0) and (0,1), mean direction (1,1)/sqrt2, target (1,1): cosine 1
    # row 1: history (1,0), target (1,0): 1;  row 2: empty history: 0
    np.testing.assert_allclose(history_cosine(split, item_emb), [1.0, 1.0, 0.0], atol=1e-12)
    split = split_of([2], [[0, 1, 3]], [1])
    # mean of (1,0) and (1,1)/sqrt2 against target (0,1)
    mean = np.array([1.0, 0.0]) + np.array([1.0, 1.0]) / np.sqrt(2)
    np.testing.assert_allclose(history_cosine(split, item_emb), [mean[1] / np.linalg.norm(mean)], atol=1e-12)


def test_ladder_features_shapes_and_popularity() -> None:
    item_emb = np.eye(4)
    split = split_of([3, 1], [[0, 1, 2], [0, 0, 1]], [1, 10])
    counts = np.array([0.0, 5.0, 0.0, 2.0])
    two = ladder_features(split, counts, item_emb, with_levels=False)
    np.testing.assert_allclose(two[:, 0], np.log1p([2.0, 5.0]))
    with_levels = ladder_features(split, counts, item_emb, with_levels=True)
    assert with_levels.shape == (2, 2 + 2 * 11)
    assert with_levels[0, 2 + 1] == 1 and with_levels[1, 2 + 10] == 1  # one-hot likes_level


def test_ladder_on_generated_data(tiny_features) -> None:
    features = load_features(tiny_features)
    counts = train_counts(features)
    assert counts.sum() == np.asarray(features.split("train").item_id).size
    scores = fit_ladder(features, "valid")
    assert [s.name for s in scores] == [Baseline.popularity, Baseline.lr_2, Baseline.lr_2_levels]
    labels = np.asarray(features.split("valid").label, dtype=np.float64)
    popularity = np.log1p(counts[np.asarray(features.split("valid").item_id)])
    assert scores[0].auc == pytest.approx(auc(labels, popularity))
    assert scores[0].logloss is None
    for score in scores[1:]:
        assert 0.0 < score.auc < 1.0 and 0.0 < score.logloss < 2.0
    with pytest.raises(ValueError, match="labels"):
        fit_ladder(features, "test")  # the test split has no labels of its own


def test_ladder_scores_the_given_labels(tiny_features) -> None:
    """Labels passed in (the suite's test labels) are the ones scored: flipping them flips every AUC."""
    features = load_features(tiny_features)
    labels = np.asarray(features.split("valid").label, dtype=np.float64)
    plain = {s.name: s.auc for s in fit_ladder(features, "valid", labels=labels)}
    flipped = {s.name: s.auc for s in fit_ladder(features, "valid", labels=1 - labels)}
    for name in Baseline:
        assert flipped[name] == pytest.approx(1 - plain[name])
