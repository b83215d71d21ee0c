"""Item-level truth: topics, click latents, popularity, levels, tags, biases, and popularity samplers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.synth.params import N_ITEM_TAGS, SizeSpec, SynthParams, SynthSize, stream


@dataclass(frozen=True)
class Items:
    """Item-level truth. Arrays are indexed by item id, row 0 is the padding item (zeros)."""

    topic: np.ndarray  # (N+1,) int64, topic of each item (row 0: -1)
    v: np.ndarray  # (N+1, d) float32 unit latent vectors that drive clicks (row 0: zeros)
    content: np.ndarray  # (N+1, d) float32 unit content latent seen by text/image (row 0: zeros)
    log_pop: np.ndarray  # (N+1,) float64 log popularity (row 0: -inf)
    pop_z: np.ndarray  # (N+1,) float64 log popularity standardised over items (row 0: 0)
    views_level: np.ndarray  # (N+1,) int64 in 0..9
    likes_level: np.ndarray  # (N+1,) int64 in 0..9
    tags: np.ndarray  # (N+1, 5) int64 tag ids, zero-padded on the right (row 0: zeros)
    w_item: np.ndarray  # (N+1,) float64 per-item bias
    quality: np.ndarray  # (N+1,) float64 q: like rate (likes_level - views_level) / likes_shift_sd
    topic_share: np.ndarray  # (K,) share of popularity mass per topic
    centres: np.ndarray  # (K, d) topic centres


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of x scaled to unit norm."""
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_items(spec: SizeSpec, prm: SynthParams, seed: int, size: SynthSize) -> Items:
    """Draw topics, latent vectors, popularity, levels, tags and item biases."""
    n, k, d = spec.n_items, spec.n_topics, prm.d_lat
    rng = stream(seed, size, "items")
    # Topic sizes Zipf-like, but every topic gets at least a few items so its pools are non-empty.
    share = np.arange(1, k + 1, dtype=np.float64) ** -prm.topic_zipf
    share /= share.sum()
    topic = rng.choice(k, size=n, p=share)
    topic[: k * 3] = np.repeat(np.arange(k), 3)  # guarantee ≥3 items per topic...
    topic = rng.permutation(topic)  # ...without making item ids informative
    centres = _unit(rng.standard_normal((k, d)))
    eps = rng.standard_normal((n, d)) / np.sqrt(d)
    eta = rng.standard_normal((n, d)) / np.sqrt(d)
    v = _unit(centres[topic] + prm.item_noise * eps)
    # Content sees the topic fully but only part (rho) of the item-specific direction that drives clicks,
    # so pretrained embeddings help but item-ID embeddings still matter.
    eps_c = prm.content_rho * eps + np.sqrt(1.0 - prm.content_rho**2) * eta
    content = _unit(centres[topic] + prm.item_noise * eps_c)

    rank = rng.permutation(n) + 1  # popularity rank of each item (1 = most popular)
    log_pop = -prm.pop_zipf * np.log(rank.astype(np.float64))
    log_pop -= np.log(np.exp(log_pop).sum())
    pop = np.exp(log_pop)
    noisy = log_pop + prm.level_noise * rng.standard_normal(n)
    views = np.minimum((np.argsort(np.argsort(noisy)) * 10) // n, 9)  # deciles 0..9
    likes = np.clip(np.rint(views + prm.likes_shift_sd * rng.standard_normal(n)), 0, 9).astype(np.int64)

    tags = _make_tags(topic, spec, prm, rng)
    w_item = prm.item_bias_sd * rng.standard_normal(n)

    topic_mass = np.bincount(topic, weights=pop, minlength=k)  # (K,)

    def pad(x: np.ndarray, fill: float) -> np.ndarray:
        return np.concatenate([np.full((1,) + x.shape[1:], fill, dtype=x.dtype), x])

    pop_z = (log_pop - log_pop.mean()) / log_pop.std()
    return Items(
        topic=pad(topic.astype(np.int64), -1),
        v=pad(v.astype(np.float32), 0.0),
        content=pad(content.astype(np.float32), 0.0),
        log_pop=pad(log_pop, -np.inf),
        pop_z=pad(pop_z, 0.0),
        views_level=pad(views.astype(np.int64), 0),
        likes_level=pad(likes, 0),
        tags=pad(tags, 0),
        w_item=pad(w_item, 0.0),
        # q is the like *rate* (likes level above views level), not the likes level itself: the spec's
        # (likes - 4.5)/2.9 tracks popularity so closely that, through s_att·q, popularity alone reached 0.75.
        quality=pad((likes - views) / prm.likes_shift_sd, 0.0),
        topic_share=topic_mass / topic_mass.sum(),
        centres=centres,
    )


def _make_tags(topic: np.ndarray, spec: SizeSpec, prm: SynthParams, rng: np.random.Generator) -> np.ndarray:
    """Tags per item: 1-5 distinct ids, mostly from the topic's pool.

    Returns:
        (N, 5) int64, distinct non-zero ids first, then zero padding.
    """
    n, k, t = spec.n_items, spec.n_topics, spec.n_tags
    draws = 8  # draw more than 5, keep the first distinct ones
    # Pools: tags 1..T are split into K contiguous pools; within a pool tag use is Zipf-like so tags recur.
    bounds = np.linspace(0, t, k + 1).astype(np.int64)
    pool_lo, pool_n = bounds[:-1], np.maximum(bounds[1:] - bounds[:-1], 1)
    zipf_u = rng.random((n, draws)) ** prm.tag_pool_skew  # skews towards the start of the pool
    from_pool = pool_lo[topic][:, None] + np.floor(zipf_u * pool_n[topic][:, None]).astype(np.int64) + 1
    rand = rng.integers(1, t + 1, size=(n, draws))
    cand = np.where(rng.random((n, draws)) < prm.tag_from_topic, from_pool, rand)  # (N, 8)
    # First occurrence of each value within a row.
    dup = (cand[:, :, None] == cand[:, None, :]) & np.tri(draws, k=-1, dtype=bool)[None]  # (N, 8, 8)
    first = ~dup.any(axis=2)  # (N, 8)
    n_tags = rng.choice(np.arange(1, 6), size=n, p=np.asarray(prm.tag_count_p) / sum(prm.tag_count_p))
    rank_in_row = np.cumsum(first, axis=1) - 1  # index among distinct values
    keep = first & (rank_in_row < n_tags[:, None])
    out = np.zeros((n, N_ITEM_TAGS), dtype=np.int64)
    rows, cols = np.nonzero(keep)
    out[rows, rank_in_row[rows, cols]] = cand[rows, cols]
    return out


@dataclass(frozen=True)
class Sampler:
    """Draws items ∝ π^power, globally or within a given topic (by inverse CDF, fully vectorised)."""

    cdf: np.ndarray  # (N,) CDF over items 1..N
    order: np.ndarray  # (N,) item ids sorted by topic
    key: np.ndarray  # (N,) topic + within-topic CDF: increasing, so (k, u) → searchsorted(key, k + u)

    @staticmethod
    def build(items: Items, power: float) -> Sampler:
        """Sampler for weights π^power (power 1: popularity; < 1: flatter, reaching the long tail more)."""
        w = np.exp(power * (items.log_pop[1:] - items.log_pop[1:].max()))  # (N,) scaled to avoid underflow
        topic = items.topic[1:]
        order = np.argsort(topic, kind="stable")
        t_sorted, w_sorted = topic[order], w[order]
        mass = np.bincount(t_sorted, weights=w_sorted)  # (K,)
        start = np.concatenate([[0.0], np.cumsum(mass)])[t_sorted]
        within = (np.cumsum(w_sorted) - start) / mass[t_sorted]  # CDF within each topic, ends at 1
        within[np.r_[t_sorted[1:] != t_sorted[:-1], True]] = 1.0  # exactly 1 at each topic's end (rounding)
        cdf = np.cumsum(w)
        return Sampler(cdf=cdf / cdf[-1], order=order + 1, key=t_sorted + within)

    def in_topics(self, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per row from the given topics (m,), for uniforms u (m,) in [0, 1). Returns (m,) ids."""
        pos = np.searchsorted(self.key, topics + u, side="right")
        return self.order[np.minimum(pos, self.order.size - 1)]

    def globally(self, u: np.ndarray) -> np.ndarray:
        """One item per uniform u (m,). Returns (m,) ids."""
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), self.cdf.size - 1) + 1
