"""Signal anatomy of the generated data: how much AUC each part of the label function is worth.

The generator knows every row's signals (s_att, s_tag, s_rep, q, popularity, user and item bias), so it can
score rows with *parts* of the true logit f and see how far each part alone, or f without it, gets. The
question it answers for the quality table: how much room is there on this data for what a quadratic
(cross) tower adds over an additive one? If f without its cross terms ranks rows almost as well as f
itself, no model can win much by modelling crosses, whatever its architecture. The same refit with the
mean-pooled history match in place of s_att says what target attention is worth over averaging the history.

Scores are compared with the expected AUC against p_true (labels drawn y ~ Bernoulli(p_true), the label
noise integrated out), over all rows of every split, so the numbers carry no sampling noise from a small
validation split. Writes benchmarks/results/signal_anatomy_<size>.json and prints a markdown table.

    python benchmarks/signal_anatomy.py [--size small] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

from qin.synth import (
    DEFAULT_PARAMS,
    SIZES,
    SynthSize,
    draw_synth,
    expected_auc,
    history_slots,
    params_with,
    signals,
)

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=[s.value for s in SynthSize])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override one int, float or str SynthParams field (to explore the generator)")
    args = parser.parse_args()
    size, prm = SynthSize(args.size), params_with(args.param)
    spec = SIZES[size]
    # The rows and labels `qin synth` writes (synthesize draws them by the same code as draw_synth).
    drawn = draw_synth(size, args.seed, prm)
    items, users, rows, p_true, y = drawn.items, drawn.users, drawn.rows, drawn.p_true, drawn.labels

    q = items.quality[rows.item]
    parts = {  # each term of f exactly as the generator's logit adds it (qin/synth/rows.py)
        "s_att": prm.w_att * rows.s_att,
        "s_att*q": prm.w_att_q * rows.s_att * q,
        "s_tag*q": prm.w_tag_q * rows.s_tag * q,
        "s_rep": prm.w_rep * rows.s_rep,
        "q": prm.w_q * q,
        "popularity": prm.w_pop * items.pop_z[rows.item],
        "user bias": users.bias[rows.user],
        "item bias": items.w_item[rows.item],
    }
    f = sum(parts.values())
    assert np.allclose(f, rows.f_raw), "the parts must add up to the generator's logit"
    crosses = parts["s_att*q"] + parts["s_tag*q"]

    table: list[tuple[str, float]] = [("oracle: f", expected_auc(p_true, f))]
    table.append(("f without the cross terms (s_att*q, s_tag*q)", expected_auc(p_true, f - crosses)))
    table.append(("f without the item bias", expected_auc(p_true, f - parts["item bias"])))
    table.append(("f without the user bias", expected_auc(p_true, f - parts["user bias"])))
    table.append(("f without s_att and s_att*q", expected_auc(p_true, f - parts["s_att"] - parts["s_att*q"])))
    # No model here sees slot positions (the reference has no positional encoding), so the recency term
    # of the generator's attention is out of every model's reach: score f with that term switched off.
    no_recency = np.concatenate([
        signals(rows.user[lo:lo + spec.chunk_rows], rows.item[lo:lo + spec.chunk_rows], users, items,
                dataclasses.replace(prm, gamma=0.0))[0]
        for lo in range(0, rows.user.size, spec.chunk_rows)])
    attention_weight = prm.w_att + prm.w_att_q * q
    f_position_free = f + attention_weight * (no_recency - rows.s_att)
    table.append(("f with the attention's recency term dropped (what position-free models can see)",
                  expected_auc(p_true, f_position_free)))
    table.append(("... and without the user bias (valid/test users are unseen in train)",
                  expected_auc(p_true, f_position_free - parts["user bias"])))
    table.append(("s_att alone", expected_auc(p_true, rows.s_att)))
    table.append(("s_att*q + s_att alone", expected_auc(p_true, parts["s_att"] + parts["s_att*q"])))
    table.append(("popularity alone", expected_auc(p_true, items.pop_z[rows.item])))

    # The best ADDITIVE model of the true signals, refitted: logistic regression on train rows over the
    # signals (no products), scored on valid + test. Against the same fit with the two products added.
    true_signals = np.column_stack([rows.s_att, rows.s_tag, rows.s_rep, q, items.pop_z[rows.item],
                               users.bias[rows.user], items.w_item[rows.item]])
    with_crosses = np.column_stack([true_signals, rows.s_att * q, rows.s_tag * q])
    train, held_out = rows.split == 0, rows.split > 0
    for name, x in (("additive fit of all signals (train -> valid+test)", true_signals),
                    ("same fit with the two products", with_crosses)):
        fit = LogisticRegression(C=1e4, max_iter=2000).fit(x[train], y[train])
        table.append((name, expected_auc(p_true[held_out], fit.decision_function(x[held_out]))))
    # What attention is worth over mean pooling, with perfect item vectors: the same fit with s_att replaced
    # by the mean-pooled match <v_t, mean_j v_hj> (what a model that averages the history can compute
    # linearly), and with its square and the history length added (some of what an MLP can do with it).
    slots = history_slots(rows.user, rows.item, users, items)
    mean_match = np.add.reduceat(slots.sim, slots.starts) / users.hist_len[rows.user]  # (n,)
    other = [rows.s_tag, rows.s_rep, q, items.pop_z[rows.item], users.bias[rows.user],
             items.w_item[rows.item], rows.s_tag * q]
    log_length = np.log(users.hist_len[rows.user].astype(np.float64))
    pooled_variants = {
        "same fit, mean-pooled match in place of s_att": [mean_match, mean_match * q],
        "... with its square and the history length": [mean_match, mean_match * q, mean_match ** 2,
                                                        mean_match ** 2 * q, log_length],
    }
    for name, extra in pooled_variants.items():
        x = np.column_stack(other + extra)
        fit = LogisticRegression(C=1e4, max_iter=3000).fit(x[train], y[train])
        table.append((name, expected_auc(p_true[held_out], fit.decision_function(x[held_out]))))
    table.append(("oracle on valid+test rows", expected_auc(p_true[held_out], f[held_out])))

    record = {"benchmark": "signal_anatomy", "size": size.value, "seed": args.seed, "rows": int(f.size),
              "params": dataclasses.asdict(prm),
              "term_std": {name: float(np.std(v)) for name, v in parts.items()},
              "expected_auc": dict(table)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if prm == DEFAULT_PARAMS else "_custom"
    (RESULTS / f"signal_anatomy_{size.value}{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"size {size.value}, {f.size:,} rows; std of each term of f:")
    print("  " + ", ".join(f"{name} {np.std(v):.3f}" for name, v in parts.items()))
    print("| score | expected AUC |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value:.4f} |")


if __name__ == "__main__":
    main()
