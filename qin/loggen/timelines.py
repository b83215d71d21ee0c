"""Users' timelines: a drifting interest, a short history drawn along it, and the interest at impression time.

Σ = total history slots of all users (ragged, stored flat, oldest first within a user).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.loggen.items import ItemTruth, PopularitySampler, draw_by_interest, draw_series_member
from qin.loggen.params import LogParams


@dataclass(frozen=True)
class Timelines:
    """All users of all splits (train users first, then valid, then test)."""

    user_id: np.ndarray  # (U,) int64 distinct ids ≥ 1 (a permutation, so ids do not reveal the split)
    hist_len: np.ndarray  # (U,) int64, 1..S
    hist_off: np.ndarray  # (U,) int64 start of each user's history in hist_item
    hist_item: np.ndarray  # (Σ,) int64 item ids, oldest first
    interest_now: np.ndarray  # (U, d) float64 unit interest at impression time (one step after the history)
    bias: np.ndarray  # (U,) float64 per-user logit offset


def history_lengths(n_users: int, seq_len: int, prm: LogParams, rng: np.random.Generator) -> np.ndarray:
    """(U,) L = 1 + NegBin(mean hist_mean - 1, shape hist_dispersion), clipped to S: median ~4, long tail."""
    r = prm.hist_dispersion
    extra = rng.negative_binomial(r, r / (r + max(prm.hist_mean - 1.0, 1e-9)), n_users)
    return np.minimum(1 + extra, seq_len).astype(np.int64)


def make_timelines(n_users: int, seq_len: int, items: ItemTruth, centres: np.ndarray, prm: LogParams,
                   rng: np.random.Generator) -> Timelines:
    """Draw every user's interest walk and history. Cold items never enter a history (they are new)."""
    d = prm.d_taste
    hist_len = history_lengths(n_users, seq_len, prm, rng)
    genre_start = rng.integers(0, centres.shape[0], n_users)
    start = centres[genre_start] + prm.user_spread * rng.standard_normal((n_users, d)) / np.sqrt(d)  # (U, d)
    start /= np.linalg.norm(start, axis=1, keepdims=True)

    # Steps 0..L-1 are the history items, step L is "now" (when the candidates are shown): L+1 per user.
    # The walk is renormalised at every step, so the interest turns at the same speed all along the
    # timeline (an unnormalised sum would slow down as it grows): cos(u_k, u_k+j) ≈ (1 + drift²)^(-j/2).
    steps = hist_len + 1
    step_off = np.cumsum(steps) - steps  # (U,)
    interest = np.empty((int(steps.sum()), d))  # (Σ+U, d) unit vectors, user after user
    current = start.copy()
    for k in range(int(steps.max())):  # ≤ S+1 rounds, each over the users still active
        active = np.nonzero(steps > k)[0]
        if k > 0:
            moved = current[active] + prm.interest_drift / np.sqrt(d) * rng.standard_normal((active.size, d))
            current[active] = moved / np.linalg.norm(moved, axis=1, keepdims=True)
        interest[step_off[active] + k] = current[active]
    is_now = np.zeros(interest.shape[0], dtype=bool)
    is_now[step_off + hist_len] = True

    allowed = ~items.cold
    sampler = PopularitySampler.build(items, prm.hist_pop_power, allowed)
    free = draw_by_interest(interest[~is_now], items, sampler, prm.hist_beta, prm.sir_proposals, rng)  # (Σ,)

    # Binge watching: a slot may continue the series of the previous slot. A chain of continuations keeps
    # the series of its last free slot, so the whole chain resolves at once.
    hist_off = np.cumsum(hist_len) - hist_len
    slot_owner = np.repeat(np.arange(n_users), hist_len)
    within = np.arange(slot_owner.size) - hist_off[slot_owner]
    continues = (within > 0) & (rng.random(slot_owner.size) < prm.p_series)
    last_free = np.maximum.accumulate(np.where(continues, -1, np.arange(slot_owner.size)))
    member = draw_series_member(items, items.series[free[last_free]], rng.random(slot_owner.size))
    hist_item = np.where(continues & allowed[member], member, free)

    return Timelines(user_id=rng.permutation(n_users).astype(np.int64) + 1, hist_len=hist_len,
                     hist_off=hist_off, hist_item=hist_item, interest_now=interest[is_now],
                     bias=prm.user_bias_sd * rng.standard_normal(n_users))


def padded_histories(timelines: Timelines, users: np.ndarray, seq_len: int) -> np.ndarray:
    """(n, S) int64 histories of the given users (n,), left-padded with 0, most recent last."""
    length = timelines.hist_len[users]
    row = np.repeat(np.arange(users.size), length)
    within = np.arange(row.size) - np.repeat(np.cumsum(length) - length, length)
    out = np.zeros((users.size, seq_len), dtype=np.int64)
    out[row, seq_len - length[row] + within] = timelines.hist_item[timelines.hist_off[users][row] + within]
    return out
