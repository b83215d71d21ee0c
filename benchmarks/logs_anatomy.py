"""What a model could learn at all from `qin synth --process logs` data: its click logit taken apart.

The oracle's AUC uses truth no model has: the user's CURRENT interest (a random walk the history only
samples), every item's true taste vector, per-item and per-user biases. This script re-draws a data set
in memory (`qin.loggen.draw_logs`, the same draw the files come from) and reports, on the test rows, the
expected AUC (label noise integrated out) of the true logit with parts replaced by what is learnable:

    oracle                          the true logit
    - user bias                     test users are unseen: their bias cannot be learnt from anything
    + interest from history         ... and u_now replaced by the unit mean of the history items' TRUE
                                    taste vectors (recency-weighted): what perfect item vectors allow
    + item bias from train          ... and each item's bias replaced by its shrunken estimate from its
                                    train rows (the most an id embedding can memorise from this many rows)

The last row is a ceiling for any model trained on the train split, still given perfect taste vectors
and series membership: real models must also learn those from the ids and the weak content vectors.

    python benchmarks/logs_anatomy.py [--size small] [--param NAME=VALUE ...]

Writes benchmarks/results/logs_anatomy_<size>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qin.loggen import LogSize, draw_logs, log_params_with
from qin.synth import expected_auc

RESULTS = Path(__file__).resolve().parent / "results"


def history_interest(draw, users: np.ndarray, half_life: float) -> np.ndarray:
    """(n, d) unit, recency-weighted mean of each user's history taste vectors (weight 2^(-age/half_life))."""
    timelines, taste = draw.timelines, draw.items.taste
    length = timelines.hist_len[users]  # (n,)
    row = np.repeat(np.arange(users.size), length)  # (Σ,)
    within = np.arange(row.size) - np.repeat(np.cumsum(length) - length, length)
    age = length[row] - 1 - within  # 0 = most recent
    vectors = taste[timelines.hist_item[timelines.hist_off[users][row] + within]]  # (Σ, d)
    pooled = np.zeros((users.size, taste.shape[1]))
    np.add.at(pooled, row, vectors * (0.5 ** (age / half_life))[:, None])
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def shrunken_item_bias(draw, prm) -> np.ndarray:
    """(N+1,) each item's bias estimated from its train rows: the mean residual label - p(other terms),
    shrunk towards 0 by n / (n + k) with k set from the prior (an empirical-Bayes posterior mean)."""
    rows, train = draw.rows, draw.rows.split == 0
    without_bias = rows.logit - draw.items.bias[rows.item]
    p_rest = 1.0 / (1.0 + np.exp(-(without_bias + draw.intercept)))
    residual = draw.labels - (0.5 * prm.label_eps + (1 - prm.label_eps) * p_rest)  # (n,)
    n_items = draw.items.bias.size
    count = np.bincount(rows.item[train], minlength=n_items)
    total = np.bincount(rows.item[train], weights=residual[train], minlength=n_items)
    slope = np.maximum((1 - prm.label_eps) * p_rest[train].mean() * (1 - p_rest[train].mean()), 1e-6)
    # residual ~ slope * bias + noise of variance ~ p(1-p); the prior of bias has variance item_bias_sd^2
    k = p_rest[train].mean() * (1 - p_rest[train].mean()) / (slope**2 * prm.item_bias_sd**2)
    return (total / slope) / (count + k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=[s.value for s in LogSize])
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--half-life", type=float, default=3.0)
    args = parser.parse_args()
    prm = log_params_with(args.param)
    draw = draw_logs(LogSize(args.size), 0, prm)
    rows, items, timelines = draw.rows, draw.items, draw.timelines
    test = rows.split == 2
    p = draw.p_true[test]
    user, item = rows.user[test], rows.item[test]
    rest = (prm.w_series * np.log1p(rows.series_hits[test]) + prm.w_quality * items.quality[item]
            + prm.w_pop * items.pop_z[item])
    match_history = np.einsum("nd,nd->n", history_interest(draw, user, args.half_life), items.taste[item])
    learnt_bias = shrunken_item_bias(draw, prm)[item]
    scores = {
        "oracle": rows.logit[test],
        "- user bias": rows.logit[test] - timelines.bias[user],
        "+ interest from history": prm.w_match * match_history + rest + items.bias[item],
        "+ item bias from train": prm.w_match * match_history + rest + learnt_bias,
    }
    table = {name: expected_auc(p, score) for name, score in scores.items()}
    oracle = table["oracle"]
    record = {"size": args.size, "params": args.param, "half_life": args.half_life,
              "expected_test_auc": table,
              "share_of_oracle_lift": {name: (auc - 0.5) / (oracle - 0.5) for name, auc in table.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{p.replace('=', '')}" for p in args.param)
    (RESULTS / f"logs_anatomy_{args.size}{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    for name, auc in table.items():
        print(f"{name:<28} {auc:.4f}  ({100 * (auc - 0.5) / (oracle - 0.5):.0f}% of the oracle's lift)")


if __name__ == "__main__":
    main()
