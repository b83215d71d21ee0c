"""AUC of the generated data: the expected AUC with label noise integrated out, and the realised AUC."""

from __future__ import annotations

import numpy as np


def expected_auc(p: np.ndarray, score: np.ndarray | None = None) -> float:
    """Expected AUC of a scorer when labels are drawn y_i ~ Bernoulli(p_i); by default the Bayes-optimal one.

    AUC* = Σ_{i≠j} p_i (1-p_j) 1[s_i > s_j] / Σ_{i≠j} p_i (1-p_j), with ties in s counted ½, in O(n log n).
    The label noise is integrated out, so scores can be compared on a few thousand rows without the
    sampling noise of a realised AUC.

    Args:
        p: (n,) true probabilities in [0, 1].
        score: (n,) any score to rank the rows by; None scores by p itself (the oracle).

    Returns:
        AUC* as a float (0.5 when every score is equal or n < 2).
    """
    p = np.asarray(p, dtype=np.float64).ravel()
    score = p if score is None else np.asarray(score, dtype=np.float64).ravel()
    if score.shape != p.shape:
        raise ValueError(f"expected_auc: score has {score.size} values, p has {p.size}")
    if p.size < 2:
        return 0.5
    _, group = np.unique(score, return_inverse=True)  # rank group of each row (n,), groups sorted by score
    pos_mass = np.bincount(group, weights=p)  # Σ p_i within each group  (G,)
    neg_mass = np.bincount(group, weights=1.0 - p)  # Σ (1-p_j) within each group  (G,)
    neg_below = np.cumsum(neg_mass) - neg_mass  # Σ (1-p_j) over strictly lower scores  (G,)
    # Pairs (i, j), i ≠ j, inside one group count ½: Σ_i p_i Σ_{j≠i} (1-p_j) = pos·neg − Σ p_i (1-p_i).
    within = pos_mass * neg_mass - np.bincount(group, weights=p * (1.0 - p))
    num = np.sum(pos_mass * neg_below) + 0.5 * np.sum(within)
    den = p.sum() * (1.0 - p).sum() - np.sum(p * (1.0 - p))
    return float(num / den) if den > 0 else 0.5


def realised_auc(y: np.ndarray, score: np.ndarray) -> float:
    """roc_auc_score, or NaN when y has a single class (possible on very small splits)."""
    from sklearn.metrics import roc_auc_score  # imported here: sklearn adds ~1 s to `import qin.synth`

    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))
