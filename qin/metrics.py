"""Pure metric functions over numpy arrays (no torch, no files).

Beside AUC and logloss, the field's other offline CTR metrics:

- ``gauc``: group (per-user) AUC, as in DIN (Zhou et al., KDD 2018) and FuxiCTR's ``gAUC``;
- ``normalized_entropy``: logloss relative to the entropy of the base rate (He et al., ADKDD 2014);
- ``calibration_ratio``: expected clicks over observed clicks (same paper).

Degenerate inputs give NaN rather than raising, like ``auc`` on a single class: a metric that is undefined
on some split (a split without clicks, no user with both classes) should not stop an evaluation.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.metrics import roc_auc_score

LOGLOSS_EPS = 1e-7  # FuxiCTR's log_loss clipping, so our logloss matches the reference logs


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC; NaN when only one class is present (AUC is undefined there)."""
    labels = np.asarray(labels)
    if labels.size == 0 or np.unique(labels).size < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _binary_labels(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    """Labels as a bool array of length n; ValueError for another length or a value other than 0/1."""
    y = np.asarray(labels).ravel()
    if y.size != n:
        raise ValueError(f"{what}: {y.size} labels for {n} predictions")
    positive = y == 1
    if not np.all(positive | (y == 0)):
        raise ValueError(f"{what}: labels must be 0 or 1")
    return positive


def gauc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray,
         weight: Literal["impressions", "clicks"] = "impressions") -> float:
    """Group AUC: the AUC of each user's own rows, averaged over users with weights.

    Definition: for every user u whose rows hold both a click and a non-click, AUC_u is the ROC-AUC of
    the scores of u's rows alone (the probability that a random clicked row of u outscores a random
    unclicked row of u, ties counting one half). GAUC = sum_u w_u * AUC_u / sum_u w_u. Users whose rows
    are all clicks or all non-clicks have no AUC and are left out of both sums.

    The weight w_u is, by default, u's number of rows (impressions). That is the definition of the DIN
    paper (Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018, section
    "Metrics": AUC_i weighted by #impression_i), and what reczoo/FuxiCTR's ``gAUC`` in
    ``fuxictr/metrics.py`` computes (each user gives ``(auc * n_samples, n_samples)``, a user with one
    class gives ``(0, 0)``).
    ``weight="clicks"`` weights by u's number of clicks instead, which is what RecBole's ``GAUC``
    (``recbole/evaluator/metrics.py``) does: it sums ``user_auc * pos_len`` over ``pos_len``, also after
    dropping users without a positive or without a negative.

    Computed for all users at once (no loop over users): rows are sorted by (user, score), tied scores of
    a user get their average rank, and each user's AUC is the Mann-Whitney statistic
    (R_pos - P (P + 1) / 2) / (P Q) from the rank sum R_pos of its P clicks among its Q non-clicks. This
    equals sklearn's ``roc_auc_score`` on each user's rows, ties included.

    Args:
        labels: (n,) 0/1 clicks.
        scores: (n,) predicted probabilities or any scores (only their order within a user matters).
        groups: (n,) user ids (any sortable dtype).
        weight: "impressions" (rows per user; DIN, FuxiCTR) or "clicks" (clicks per user; RecBole).

    Returns:
        The GAUC; NaN when no user has both classes (including empty inputs).

    Raises:
        ValueError: the arrays differ in length, a label is not 0/1, a score is NaN, or an unknown weight.
    """
    if weight not in ("impressions", "clicks"):
        raise ValueError(f"gauc: weight must be 'impressions' or 'clicks', not {weight!r}")
    s = np.asarray(scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    y = _binary_labels(labels, s.size, "gauc")
    if g.size != s.size:
        raise ValueError(f"gauc: {g.size} group ids for {s.size} predictions")
    if s.size == 0:
        return float("nan")
    if np.isnan(s).any():
        raise ValueError("gauc: scores contain NaN")
    _, user = np.unique(g, return_inverse=True)  # dense codes 0..U-1 whatever the id dtype
    user = user.ravel()
    order = np.lexsort((s, user))  # by user, then by score ascending
    user, s, y = user[order], s[order], y[order]
    n = s.size
    position = np.arange(n, dtype=np.float64)
    # Runs of equal (user, score): each member gets the run's mean position.
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.logical_or(user[1:] != user[:-1], s[1:] != s[:-1], out=new_run[1:])
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n) - 1
    run = np.cumsum(new_run) - 1
    mean_position = ((run_start + run_end) / 2.0)[run]
    # 1-based rank within the user: subtract the position of the user's first row.
    user_first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    rank = mean_position - position[user_first][user] + 1.0
    users = user_first.size
    rows = np.bincount(user, minlength=users).astype(np.float64)
    clicks = np.bincount(user, weights=y.astype(np.float64), minlength=users)
    rank_sum = np.bincount(user, weights=np.where(y, rank, 0.0), minlength=users)
    non_clicks = rows - clicks
    both = (clicks > 0) & (non_clicks > 0)
    if not both.any():
        return float("nan")
    p, q = clicks[both], non_clicks[both]
    user_auc = (rank_sum[both] - p * (p + 1.0) / 2.0) / (p * q)
    w = rows[both] if weight == "impressions" else p
    return float(np.sum(w * user_auc) / np.sum(w))


def normalized_entropy(labels: np.ndarray, probabilities: np.ndarray, eps: float = LOGLOSS_EPS) -> float:
    """Normalised entropy (NE): the logloss over the entropy of the base rate.

    Definition (He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook", ADKDD 2014,
    "Evaluation metrics"): NE = logloss / H(p) with p the mean label of these rows (the empirical CTR) and
    H(p) = -(p log p + (1 - p) log(1 - p)), the logloss a model would get by predicting p on every row.
    So NE = 1 for the constant base-rate prediction and lower is better; NE < 1 means the model gains
    over knowing only the CTR. The numerator is ``logloss`` with its clipping at ``eps``; both use
    natural logs (the base cancels in the ratio anyway).

    Returns:
        NE; NaN when the base rate is 0 or 1 (H(p) = 0: nothing to normalise by) or there are no rows.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = _binary_labels(labels, p.size, "normalized_entropy")
    if y.size == 0:
        return float("nan")
    rate = float(y.mean())
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    entropy = -(rate * np.log(rate) + (1.0 - rate) * np.log1p(-rate))
    return logloss(y, p, eps) / entropy


def calibration_ratio(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Calibration ratio: expected clicks over observed clicks, sum(p) / sum(y).

    Definition (He et al., ADKDD 2014, "Evaluation metrics"): the average predicted CTR over the
    empirical CTR, that is the number of clicks the model expects over the number actually observed.
    1 is calibrated on the whole, above 1 over-predicts, below 1 under-predicts. It says nothing about
    the calibration of slices (a model can be right on average and wrong everywhere). Probabilities are
    used as given, not clipped.

    Returns:
        The ratio; NaN when there are no clicks (or no rows), where it would be infinite or 0/0: NaN,
        like the other undefined metrics here, rather than inf.
    """
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    y = _binary_labels(labels, p.size, "calibration_ratio")
    clicks = int(np.count_nonzero(y))
    if clicks == 0:
        return float("nan")
    return float(p.sum() / clicks)
