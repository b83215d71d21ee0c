"""Impression rows: candidates per user, the true click logit, the calibrated intercept and p_true."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.loggen.items import ItemTruth, PopularitySampler, draw_by_interest, draw_series_member
from qin.loggen.params import LogParams
from qin.loggen.timelines import Timelines


@dataclass(frozen=True)
class Rows:
    """All impression rows of all splits (split 0 = train, 1 = valid, 2 = test), in output order."""

    split: np.ndarray  # (n,) int8
    user: np.ndarray  # (n,) int64 user index into Timelines arrays
    item: np.ndarray  # (n,) int64 target item id
    source: np.ndarray  # (n,) int8: 0 popularity, 1 interest, 2 series, 3 cold
    match: np.ndarray  # (n,) float64 <u_now, v_t>
    series_hits: np.ndarray  # (n,) int64 history items in the target's series
    logit: np.ndarray  # (n,) float64 f without the intercept


SOURCES = ("popularity", "interest", "series", "cold")


def split_users(row_counts: list[int], rows_per_user: int) -> list[np.ndarray]:
    """User index ranges of train, valid and test (disjoint), ceil(rows / rows_per_user) users each."""
    counts = [-(-r // rows_per_user) for r in row_counts]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]


def make_rows(users_by_split: list[np.ndarray], row_counts: list[int], timelines: Timelines, items: ItemTruth,
              prm: LogParams, rng: np.random.Generator) -> Rows:
    """Candidates at each user's current step and their logit f (rows of a split are shuffled)."""
    split_parts, user_parts = [], []
    for s, (us, n_rows) in enumerate(zip(users_by_split, row_counts, strict=True)):
        user_parts.append(np.repeat(us, prm.rows_per_user)[:n_rows][rng.permutation(n_rows)])
        split_parts.append(np.full(n_rows, s, dtype=np.int8))
    split, user = np.concatenate(split_parts), np.concatenate(user_parts)
    n = user.size

    u = rng.random(n)
    cuts = np.cumsum([prm.p_cand_interest, prm.p_cand_series, prm.p_cand_cold])
    source = (np.searchsorted(cuts, u, side="right").astype(np.int8) + 1) % 4  # 1, 2, 3 as in SOURCES; rest 0
    source[(source == 3) & (split == 0)] = 0  # new items do not exist yet in the train period

    warm = PopularitySampler.build(items, prm.cand_pop_power, ~items.cold)
    item = warm.draw(rng.random(n))
    pick = source == 1
    item[pick] = draw_by_interest(timelines.interest_now[user[pick]], items, warm, prm.hist_beta,
                                  prm.sir_proposals, rng)
    # The next episode: another item of the series of one random history item (may be new in valid/test).
    slot = timelines.hist_off[user] + (rng.random(n) * timelines.hist_len[user]).astype(np.int64)
    episode = draw_series_member(items, items.series[timelines.hist_item[slot]], rng.random(n))
    pick = (source == 2) & ((split > 0) | ~items.cold[episode])
    item[pick] = episode[pick]
    source[(source == 2) & ~pick] = 0
    new = PopularitySampler.build(items, prm.cand_pop_power, items.cold & (np.arange(items.cold.size) > 0))
    pick = source == 3
    if new.cdf[-1] > 0:
        item[pick] = new.draw(rng.random(int(pick.sum())))
    else:
        source[pick] = 0

    match = np.einsum("nd,nd->n", timelines.interest_now[user], items.taste[item])
    hits = series_hits(user, item, timelines, items)
    logit = (prm.w_match * match + prm.w_series * np.log1p(hits) + prm.w_quality * items.quality[item]
             + items.bias[item] + prm.w_pop * items.pop_z[item] + timelines.bias[user])
    return Rows(split=split, user=user, item=item, source=source, match=match, series_hits=hits, logit=logit)


def series_hits(user: np.ndarray, item: np.ndarray, timelines: Timelines, items: ItemTruth) -> np.ndarray:
    """(n,) how many of each row's history items belong to the target's series (ragged, no padding)."""
    length = timelines.hist_len[user]
    row = np.repeat(np.arange(user.size), length)
    within = np.arange(row.size) - np.repeat(np.cumsum(length) - length, length)
    slot_item = timelines.hist_item[timelines.hist_off[user][row] + within]
    same = items.series[slot_item] == items.series[item][row]
    return np.bincount(row, weights=same, minlength=user.size).astype(np.int64)


def click_probability(logit: np.ndarray, intercept: float, label_eps: float) -> np.ndarray:
    """p_true = eps/2 + (1 - eps) sigmoid(f + intercept): even a perfect model cannot predict every label."""
    return 0.5 * label_eps + (1.0 - label_eps) / (1.0 + np.exp(-(logit + intercept)))


def calibrate_intercept(logit: np.ndarray, label_eps: float, target_rate: float) -> float:
    """The intercept that makes mean p_true equal target_rate (bisection; the mean rises with it)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if click_probability(logit, mid, label_eps).mean() < target_rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
