"""qin.metrics: GAUC, normalised entropy and calibration ratio against hand-computed values and their
definitions (GAUC also against a slow per-user sklearn loop)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from qin.metrics import auc, calibration_ratio, gauc, logloss, normalized_entropy

# Three users, rows interleaved on purpose:
#   a: labels 1 0 1 0, scores .9 .5 .5 .1 -> pairs (pos, neg): .9>.5, .9>.1, .5=.5 (one half), .5>.1
#      AUC_a = 3.5 / 4 = .875, 4 rows, 2 clicks
#   b: labels 0 1 0, scores .8 .3 .2 -> .3<.8, .3>.2: AUC_b = 1 / 2, 3 rows, 1 click
#   c: labels 0 0, scores .5 .9 -> one class: left out (its scores tie a's across users, which must not count)
USERS = np.array([7, 3, 7, 9, 3, 7, 9, 3, 7])
LABELS = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.5, 0.5, 0.3, 0.5, 0.9, 0.2, 0.1])
A, B, C = 7, 3, 9


def test_hand_computed_case_fixture_is_what_the_comment_says():
    for user, expected in ((A, 0.875), (B, 0.5)):
        rows = USERS == user
        assert roc_auc_score(LABELS[rows], SCORES[rows]) == expected
    assert np.unique(LABELS[USERS == C]).size == 1


def test_gauc_hand_computed_with_ties_and_a_single_class_user():
    assert gauc(LABELS, SCORES, USERS) == pytest.approx((4 * 0.875 + 3 * 0.5) / 7)  # 5/7, by impressions
    assert gauc(LABELS, SCORES, USERS, weight="clicks") == pytest.approx((2 * 0.875 + 1 * 0.5) / 3)
    assert gauc(LABELS, SCORES, USERS) != pytest.approx(auc(LABELS, SCORES))  # not the pooled AUC


def test_gauc_ignores_row_order_and_the_id_type():
    order = np.random.default_rng(0).permutation(LABELS.size)
    expected = gauc(LABELS, SCORES, USERS)
    assert gauc(LABELS[order], SCORES[order], USERS[order]) == pytest.approx(expected)
    names = np.array([f"user-{u}" for u in USERS])
    assert gauc(LABELS, SCORES, names) == pytest.approx(expected)
    assert gauc(LABELS.astype(np.float32), SCORES.astype(np.float32), USERS) == pytest.approx(expected)


def slow_gauc(labels: np.ndarray, scores: np.ndarray, users: np.ndarray) -> dict[str, float]:
    """The reference definition, one sklearn AUC per user: weighted by rows (FuxiCTR's gAUC) and by clicks
    (RecBole's GAUC)."""
    totals = {"impressions": 0.0, "clicks": 0.0}
    weights = {"impressions": 0.0, "clicks": 0.0}
    for user in np.unique(users):
        rows = users == user
        clicks = labels[rows].sum()
        if 0 < clicks < rows.sum():
            user_auc = roc_auc_score(labels[rows], scores[rows])
            for weight, w in (("impressions", rows.sum()), ("clicks", clicks)):
                totals[weight] += w * user_auc
                weights[weight] += w
    return {weight: totals[weight] / weights[weight] for weight in totals}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_equals_a_per_user_sklearn_loop_on_random_data_with_ties(seed):
    rng = np.random.default_rng(seed)
    rows = 2500
    users = rng.integers(0, 250, rows)  # ~10 rows a user, many users with one class
    scores = rng.integers(0, 6, rows) / 5.0  # six score levels: many ties inside users
    labels = (rng.random(rows) < 0.1 + 0.5 * scores).astype(np.float64)
    expected = slow_gauc(labels, scores, users)
    for weight in ("impressions", "clicks"):
        assert gauc(labels, scores, users, weight=weight) == pytest.approx(expected[weight], abs=1e-12)


def test_gauc_degenerate_inputs():
    users = np.array([1, 1, 2, 2])
    assert math.isnan(gauc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4]), users))  # one class each
    assert math.isnan(gauc(np.array([]), np.array([]), np.array([])))
    assert gauc(np.array([1, 0]), np.array([0.5, 0.5]), np.array([1, 1])) == 0.5  # all tied
    with pytest.raises(ValueError, match="labels"):
        gauc(np.array([1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4]), users)
    with pytest.raises(ValueError, match="group ids"):
        gauc(np.array([1, 0, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4]), users[:3])
    with pytest.raises(ValueError, match="0 or 1"):
        gauc(np.array([1, 0, 2, 0]), np.array([0.1, 0.2, 0.3, 0.4]), users)
    with pytest.raises(ValueError, match="NaN"):
        gauc(np.array([1, 0, 1, 0]), np.array([0.1, np.nan, 0.3, 0.4]), users)
    with pytest.raises(ValueError, match="weight"):
        gauc(np.array([1, 0, 1, 0]), np.array([0.1, 0.2, 0.3, 0.4]), users, weight="users")  # type: ignore[arg-type]


def test_gauc_is_vectorised_over_users():
    rng = np.random.default_rng(0)
    rows = 500_000
    users = rng.integers(0, 100_000, rows)
    scores = rng.random(rows).round(3)
    labels = (rng.random(rows) < 0.3).astype(np.float64)
    started = time.perf_counter()
    value = gauc(labels, scores, users)
    assert time.perf_counter() - started < 5.0  # ~0.2 s here; a Python loop over 100k users takes far longer
    assert 0.45 < value < 0.55  # random scores


def test_normalized_entropy_against_its_definition():
    rng = np.random.default_rng(0)
    labels = (rng.random(5000) < 0.2).astype(np.float64)
    probabilities = np.clip(0.2 + 0.3 * (labels - 0.2) + 0.1 * rng.standard_normal(5000), 0.01, 0.99)
    p = labels.mean()
    expected = -np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities)) / -(
        p * np.log(p) + (1 - p) * np.log(1 - p))
    assert normalized_entropy(labels, probabilities) == pytest.approx(expected, rel=1e-12)
    assert normalized_entropy(labels, probabilities) == pytest.approx(
        logloss(labels, probabilities) / logloss(labels, np.full(labels.size, p)))
    assert normalized_entropy(labels, probabilities) < 1  # informative predictions beat the base rate


def test_normalized_entropy_is_one_for_predicting_the_base_rate():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert normalized_entropy(labels, np.full(labels.size, 0.2)) == pytest.approx(1.0, rel=1e-12)
    assert normalized_entropy(labels, np.full(labels.size, 0.5)) > 1  # a worse constant


def test_normalized_entropy_degenerate_inputs():
    assert math.isnan(normalized_entropy(np.zeros(4), np.full(4, 0.1)))  # base rate 0
    assert math.isnan(normalized_entropy(np.ones(4), np.full(4, 0.9)))  # base rate 1
    assert math.isnan(normalized_entropy(np.array([]), np.array([])))


def test_calibration_ratio():
    labels = np.array([1, 0, 0, 1, 0])
    assert calibration_ratio(labels, np.array([0.5, 0.4, 0.3, 0.6, 0.2])) == pytest.approx(2.0 / 2)
    assert calibration_ratio(labels, np.array([0.9, 0.5, 0.5, 0.9, 0.2])) == pytest.approx(3.0 / 2)  # over
    assert calibration_ratio(labels, np.full(5, 0.1)) == pytest.approx(0.5 / 2)  # under
    assert calibration_ratio(labels, np.full(5, labels.mean())) == pytest.approx(1.0)  # the base rate
    assert math.isnan(calibration_ratio(np.zeros(3), np.full(3, 0.2)))  # no clicks: undefined, NaN not inf
    assert math.isnan(calibration_ratio(np.array([]), np.array([])))
