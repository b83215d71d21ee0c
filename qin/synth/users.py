"""Users: interest topics, biases and ragged behaviour histories."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.synth.items import Items, Sampler
from qin.synth.params import SizeSpec, SynthParams, SynthSize, stream


@dataclass(frozen=True)
class Users:
    """User-level truth for all splits (train users first, then valid, then test)."""

    user_id: np.ndarray  # (U,) int64, distinct ids ≥ 1 (a permutation, so splits interleave in id)
    topics: np.ndarray  # (U, 3) int64 interest topics (unused slots repeat the first)
    weights: np.ndarray  # (U, 3) float64 topic weights (0 for unused slots), rows sum to 1
    bias: np.ndarray  # (U,) float64 b_u
    hist_len: np.ndarray  # (U,) int64 L_u in 1..S
    hist_off: np.ndarray  # (U+1,) int64 offsets into hist_flat
    hist_flat: np.ndarray  # (Σ L,) int64 item ids, oldest first within each user
    recent_tags: np.ndarray  # (U, 25) int64 distinct tags of the last 5 history items, zeros elsewhere


def make_users(n_users: int, items: Items, spec: SizeSpec, prm: SynthParams, seed: int,
               size: SynthSize) -> Users:
    """Draw users' interests, biases and histories (ragged, oldest first)."""
    rng = stream(seed, size, "users")
    k = spec.n_topics
    n_top = rng.choice(np.arange(1, 4), size=n_users, p=np.asarray(prm.user_topic_p) / sum(prm.user_topic_p))
    # Three distinct topics per user by Gumbel top-3 on log topic share, in blocks to bound memory.
    topics = np.empty((n_users, 3), dtype=np.int64)
    for lo in range(0, n_users, 65536):
        g = np.log(items.topic_share)[None, :] + rng.gumbel(size=(min(65536, n_users - lo), k))
        topics[lo : lo + 65536] = np.argsort(-g, axis=1)[:, :3]
    w = rng.gamma(1.0, size=(n_users, 3)) * (np.arange(3)[None, :] < n_top[:, None])
    w /= w.sum(axis=1, keepdims=True)
    bias = prm.user_bias_sd * rng.standard_normal(n_users)

    r = prm.hist_dispersion
    hist_len = np.minimum(1 + rng.negative_binomial(r, r / (r + prm.hist_mean), size=n_users), spec.seq_len)
    hist_off = np.concatenate([[0], np.cumsum(hist_len)])
    total = int(hist_off[-1])
    owner = np.repeat(np.arange(n_users), hist_len)  # (Σ L,)
    pos = np.arange(total) - hist_off[owner]  # position within the user's history
    slot_topic = topics[owner, pick_slot(w[owner], rng.random(total))]
    from_topic = rng.random(total) < prm.p_hist_topic
    u = rng.random(total)
    sampler = Sampler.build(items, prm.hist_pop_power)
    hist = np.where(from_topic, sampler.in_topics(slot_topic, u), sampler.globally(u))
    # Repeats: copy an earlier slot. Resolve chains (a repeat of a repeat) by iterating to a fixed point.
    rep = (pos > 0) & (rng.random(total) < prm.p_repeat)
    src = np.where(rep, hist_off[owner] + np.floor(rng.random(total) * np.maximum(pos, 1)).astype(np.int64),
                   np.arange(total))
    for _ in range(64):
        new = hist[src]
        if np.array_equal(new, hist):
            break
        hist = new

    # Union of the tags of the last 5 history items, deduplicated (zeros are padding and never match).
    last5 = np.zeros((n_users, 5), dtype=np.int64)
    back = np.arange(5)[None, :]  # 0 = most recent
    ok = back < hist_len[:, None]
    idx = hist_off[1:, None] - 1 - back  # (U, 5)
    last5[ok] = hist[idx[ok]]
    tg = np.sort(items.tags[last5].reshape(n_users, -1), axis=1)  # (U, 25)
    tg[:, 1:][tg[:, 1:] == tg[:, :-1]] = 0
    return Users(user_id=rng.permutation(n_users).astype(np.int64) + 1, topics=topics, weights=w, bias=bias,
                 hist_len=hist_len.astype(np.int64), hist_off=hist_off.astype(np.int64), hist_flat=hist,
                 recent_tags=np.sort(tg, axis=1))


def pick_slot(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index 0..2 drawn from per-row weights (m, 3) with uniforms u (m,) in [0, 1).

    u is scaled by each row's own total, so rounding can never select a trailing zero-weight slot.
    """
    cum = np.cumsum(weights, axis=1)  # (m, 3)
    return (u[:, None] * cum[:, -1:] >= cum).sum(axis=1)


def padded_history(users: Users, rows_user: np.ndarray, seq_len: int) -> np.ndarray:
    """Left-padded histories, most recent last.

    Args:
        rows_user: (n,) user indices.

    Returns:
        (n, S) int64.
    """
    n = rows_user.size
    L = users.hist_len[rows_user]
    rep = np.repeat(np.arange(n), L)
    within = np.arange(rep.size) - np.repeat(np.cumsum(L) - L, L)
    out = np.zeros((n, seq_len), dtype=np.int64)
    out[rep, seq_len - L[rep] + within] = users.hist_flat[users.hist_off[rows_user][rep] + within]
    return out
