"""Impression rows: candidates per user, their true signals (s_att, s_rep, s_tag), logits and β0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.synth.items import Items, Sampler
from qin.synth.params import CANDIDATES_PER_USER, SizeSpec, SynthParams, SynthSize, stream
from qin.synth.users import Users, pick_slot


@dataclass(frozen=True)
class Rows:
    """All impression rows of all splits (split 0 = train, 1 = valid, 2 = test), in output order."""

    split: np.ndarray  # (n,) int8
    user: np.ndarray  # (n,) int64 user index into Users arrays
    item: np.ndarray  # (n,) int64 target item id
    s_att: np.ndarray  # (n,) float64
    s_rep: np.ndarray  # (n,) float64
    s_tag: np.ndarray  # (n,) float64
    f_raw: np.ndarray  # (n,) float64 logit without β0


def _candidates(split_users: list[np.ndarray], split_rows: list[int], users: Users, items: Items,
                prm: SynthParams, seed: int, size: SynthSize) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (user, target): 4 per user, 35% from the user's topics and 65% from global popularity.

    Rows of a split are shuffled (so a user's rows are not adjacent) and cut to the split's row count.

    Returns:
        split (n,) int8, user (n,) int64, item (n,) int64.
    """
    rng = stream(seed, size, "candidates")
    s_all, u_all = [], []
    for s, (us, n_rows) in enumerate(zip(split_users, split_rows, strict=True)):
        ru = np.repeat(us, CANDIDATES_PER_USER)[:n_rows]
        u_all.append(ru[rng.permutation(n_rows)])
        s_all.append(np.full(n_rows, s, dtype=np.int8))
    user = np.concatenate(u_all)
    n = user.size
    topic = users.topics[user, pick_slot(users.weights[user], rng.random(n))]
    u = rng.random(n)
    by_topic = Sampler.build(items, prm.topic_cand_pop_power).in_topics(topic, u)
    by_pop = Sampler.build(items, prm.cand_pop_power).globally(u)
    item = np.where(rng.random(n) < prm.p_topic_candidate, by_topic, by_pop)
    return np.concatenate(s_all), user, item


@dataclass(frozen=True)
class HistorySlots:
    """The real history slots of a chunk of rows, flattened row after row (no padding)."""

    starts: np.ndarray  # (n,) index of each row's first slot
    row: np.ndarray  # (Σ L,) row of each slot
    item: np.ndarray  # (Σ L,) history item id
    age: np.ndarray  # (Σ L,) float64, 0 = most recent
    sim: np.ndarray  # (Σ L,) float64 <v_t, v_h> of the row's target and the slot's item


def history_slots(user: np.ndarray, item: np.ndarray, users: Users, items: Items) -> HistorySlots:
    """The real (unpadded) history slots of rows (user, target item), with each slot's age and <v_t, v_h>.

    Args:
        user: (n,) user indices.  item: (n,) target item ids.
    """
    n = user.size
    L = users.hist_len[user]  # (n,) all ≥ 1, so no empty segment in reduceat
    starts = np.cumsum(L) - L
    rep = np.repeat(np.arange(n), L)  # (Σ,) row of each slot
    within = np.arange(rep.size) - starts[rep]
    slot_item = users.hist_flat[users.hist_off[user][rep] + within]  # (Σ,)
    age = (L[rep] - 1 - within).astype(np.float64)  # 0 = most recent
    sim = np.einsum("ij,ij->i", items.v[item][rep], items.v[slot_item], dtype=np.float64)  # (Σ,)
    return HistorySlots(starts=starts, row=rep, item=slot_item, age=age, sim=sim)


def signals(user: np.ndarray, item: np.ndarray, users: Users, items: Items,
            prm: SynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s_att, s_rep, s_tag for a chunk of rows, over the ragged history slots (no padding is touched).

    Args:
        user: (n,) user indices.  item: (n,) target item ids.

    Returns:
        s_att (n,), s_rep (n,), s_tag (n,) float64.
    """
    slots = history_slots(user, item, users, items)
    starts, rep, sim = slots.starts, slots.row, slots.sim
    if prm.attention == "relu":
        weight = np.maximum(sim - prm.relu_threshold, 0.0) * np.exp(-prm.gamma * np.log1p(slots.age))  # (Σ,)
        s_att = prm.relu_scale * np.add.reduceat(weight * sim, starts)
    else:
        logit = sim / prm.tau - prm.gamma * np.log1p(slots.age)
        e = np.exp(logit - np.maximum.reduceat(logit, starts)[rep])
        s_att = np.add.reduceat(e * sim, starts) / np.add.reduceat(e, starts)
    s_rep = np.maximum.reduceat((slots.item == item[rep]).astype(np.float64), starts)

    tt = items.tags[item]  # (n, 5)
    rt = users.recent_tags[user]  # (n, 25)
    inter = ((tt[:, :, None] == rt[:, None, :]) & (tt[:, :, None] != 0)).any(axis=2).sum(axis=1)
    union = (tt != 0).sum(axis=1) + (rt != 0).sum(axis=1) - inter
    s_tag = inter / np.maximum(union, 1)
    return s_att, s_rep, s_tag


def _raw_logit(s_att: np.ndarray, s_rep: np.ndarray, s_tag: np.ndarray, user: np.ndarray, item: np.ndarray,
               users: Users, items: Items, prm: SynthParams) -> np.ndarray:
    """f − β0 (docs/demo_data.md §3). All inputs (n,); returns (n,) float64."""
    q = items.quality[item]
    return (prm.w_att * s_att + prm.w_att_q * s_att * q + prm.w_tag_q * s_tag * q + prm.w_rep * s_rep
            + prm.w_q * q + prm.w_pop * items.pop_z[item] + users.bias[user] + items.w_item[item])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-x)), elementwise."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def bisect_beta0(f_raw: np.ndarray, target: float) -> float:
    """β0 such that mean(sigmoid(f_raw + β0)) == target (to 1e-10)."""
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sigmoid(f_raw + mid).mean() < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def make_rows(spec: SizeSpec, users: Users, items: Items, prm: SynthParams, seed: int,
              size: SynthSize, split_users: list[np.ndarray]) -> Rows:
    """Candidates plus their signals and raw logits, computed in fixed-size chunks."""
    split_rows = [spec.train_rows, spec.valid_rows, spec.test_rows]
    split, user, item = _candidates(split_users, split_rows, users, items, prm, seed, size)
    n = user.size
    s_att, s_rep, s_tag = np.empty(n), np.empty(n), np.empty(n)
    for lo in range(0, n, spec.chunk_rows):
        sl = slice(lo, lo + spec.chunk_rows)
        s_att[sl], s_rep[sl], s_tag[sl] = signals(user[sl], item[sl], users, items, prm)
    f_raw = _raw_logit(s_att, s_rep, s_tag, user, item, users, items, prm)
    return Rows(split=split, user=user, item=item, s_att=s_att, s_rep=s_rep, s_tag=s_tag, f_raw=f_raw)
