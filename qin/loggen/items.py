"""Item truth: genre, taste, long-tail popularity, hidden series, quality, bias, cold flag, tags, levels.

Arrays indexed by item id have N+1 rows; row 0 is the padding item and is never drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qin.loggen.params import LogParams, LogSizeSpec

TAGS_PER_ITEM = 5  # item_info.item_tags is zero-padded to 5 (as in the challenge)
SAMPLING_CHUNK = 16_384  # fixed, so chunked draws give the same numbers whatever the data size


@dataclass(frozen=True)
class ItemTruth:
    """What the generator knows about items (a model sees only ids, tags, levels and item_emb_d128)."""

    genre: np.ndarray  # (N+1,) int64
    taste: np.ndarray  # (N+1, d) float64 unit vectors; row 0 = 0
    series: np.ndarray  # (N+1,) int64 hidden series id in 0..C-1; row 0 = -1
    log_pop: np.ndarray  # (N+1,) float64 log intrinsic popularity; row 0 = -inf
    pop_z: np.ndarray  # (N+1,) float64 log_pop standardised over shown items; row 0 = 0
    quality: np.ndarray  # (N+1,) float64 ~N(0, 1), correlated with pop_z
    bias: np.ndarray  # (N+1,) float64 per-item logit offset
    cold: np.ndarray  # (N+1,) bool: never in train; row 0 = True so it is never drawn
    tags: np.ndarray  # (N+1, 5) int64, ids 1..T, zero padded on the right
    likes_level: np.ndarray  # (N+1,) int64 0..9
    views_level: np.ndarray  # (N+1,) int64 0..9
    series_members: np.ndarray  # (N,) item ids ordered by series
    series_start: np.ndarray  # (C+1,) offsets of each series in series_members


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    """Cumulative probabilities (n,) of ranks 1..n under p ∝ rank^-exponent."""
    w = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return np.cumsum(w) / w.sum()


def _draw_rank(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cdf, u, side="right"), cdf.size - 1)


def _deciles(score: np.ndarray) -> np.ndarray:
    """0..9 by rank: each level holds a tenth of the items."""
    rank = np.argsort(np.argsort(score, kind="stable"), kind="stable")
    return (rank * 10 // score.size).astype(np.int64)


def genre_centres(n_genres: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(G, d) random unit vectors: the centres items and users scatter around."""
    return _unit(rng.standard_normal((n_genres, d)))


def make_items(spec: LogSizeSpec, prm: LogParams, centres: np.ndarray, rng: np.random.Generator) -> ItemTruth:
    n, d, g = spec.n_items, prm.d_taste, spec.n_genres
    genre = _draw_rank(_zipf_cdf(g, prm.genre_zipf), rng.random(n))  # (N,)
    taste = _unit(centres[genre] + prm.item_spread * rng.standard_normal((n, d)) / np.sqrt(d))  # (N, d)

    # Popularity is a random permutation of Zipf ranks, so it is unrelated to genre and taste.
    log_pop = -prm.pop_zipf * np.log(rng.permutation(n) + 1.0)  # (N,)
    # Standardised over the items users are shown (weights ∝ pop^cand_pop_power), not over the catalogue:
    # then w_pop means the same at every size, although the long tail grows with N.
    shown = np.exp(prm.cand_pop_power * (log_pop - log_pop.max()))
    shown_mean = np.average(log_pop, weights=shown)
    pop_z = (log_pop - shown_mean) / np.sqrt(np.average((log_pop - shown_mean) ** 2, weights=shown))
    r = prm.quality_pop_corr
    quality = r * pop_z + np.sqrt(1.0 - r * r) * rng.standard_normal(n)
    bias = prm.item_bias_sd * rng.standard_normal(n)
    cold = np.zeros(n, dtype=bool)
    cold[rng.permutation(n)[: int(round(prm.cold_share * n))]] = True

    # Series are drawn independently of genre and taste: only co-occurrence in logs reveals them.
    n_series = max(1, int(round(n / prm.series_mean_size)))
    series = _draw_rank(_zipf_cdf(n_series, prm.series_zipf), rng.random(n))  # (N,)
    members = np.argsort(series, kind="stable") + 1  # (N,) item ids
    starts = np.searchsorted(series[members - 1], np.arange(n_series + 1))

    views = _deciles(pop_z + prm.level_noise * rng.standard_normal(n))
    likes = _deciles(pop_z + prm.likes_quality * quality + prm.level_noise * rng.standard_normal(n))
    tags = _make_tags(genre, spec, prm, rng)

    def pad(x: np.ndarray, first: float) -> np.ndarray:
        return np.concatenate([np.full((1, *x.shape[1:]), first, dtype=x.dtype), x])

    return ItemTruth(genre=pad(genre, 0), taste=pad(taste, 0.0), series=pad(series, -1),
                     log_pop=pad(log_pop, -np.inf), pop_z=pad(pop_z, 0.0), quality=pad(quality, 0.0),
                     bias=pad(bias, 0.0), cold=pad(cold, True), tags=pad(tags, 0), likes_level=pad(likes, 0),
                     views_level=pad(views, 0), series_members=members, series_start=starts)


def _make_tags(genre: np.ndarray, spec: LogSizeSpec, prm: LogParams, rng: np.random.Generator) -> np.ndarray:
    """(N, 5) tag ids: 1 + Binomial(4, p) distinct tags per item, some from the genre's pool, zero padded.

    Genre g owns tags g+1, g+1+G, g+1+2G, ...; the global draws follow a Zipf law over a shuffled order,
    so the commonest tags say nothing about taste.
    """
    n, g, t = genre.size, spec.n_genres, spec.n_tags
    pool_size = t // g
    in_pool = 1 + genre[:, None] + g * _draw_rank(_zipf_cdf(pool_size, prm.tag_zipf), rng.random((n, 5)))
    global_order = rng.permutation(t) + 1
    global_draw = global_order[_draw_rank(_zipf_cdf(t, prm.tag_zipf), rng.random((n, 5)))]
    tags = np.where(rng.random((n, 5)) < prm.tag_from_genre, in_pool, global_draw)  # (N, 5)
    count = 1 + rng.binomial(TAGS_PER_ITEM - 1, prm.tag_extra_p, n)
    tags[np.arange(TAGS_PER_ITEM)[None, :] >= count[:, None]] = 0
    # Drop duplicates, then move zeros to the right (ids end up sorted; an item's tag order is arbitrary).
    tags = np.sort(tags, axis=1)
    tags[:, 1:][tags[:, 1:] == tags[:, :-1]] = 0
    order = np.argsort(tags == 0, axis=1, kind="stable")
    return np.take_along_axis(tags, order, axis=1).astype(np.int64)


def item_embedding(items: ItemTruth, prm: LogParams, dim: int, rng: np.random.Generator) -> np.ndarray:
    """(N+1, dim) float64 item_emb_d128, row 0 = zeros: a weak linear view of taste, PCA-rotated and scaled.

    x_i = (v_i + noise) A + z_i B + e_i: the taste part has total variance ~1 + d·noise², the nuisance part
    k·sd², the spectrum-shaped noise dim·sd². Noise added in the taste subspace itself means no linear
    decoder can recover v_i. The result is rotated onto its principal axes (as the challenge's vectors are
    PCA outputs) and scaled so the first component's std is content_top_std.
    """
    taste = items.taste[1:]
    n, d = taste.shape
    k = prm.content_nuisance_dim
    basis, _ = np.linalg.qr(rng.standard_normal((dim, d + k)))  # (dim, d+k) orthonormal columns
    signal = (taste + prm.content_taste_noise * rng.standard_normal((n, d))) @ basis[:, :d].T
    nuisance = prm.content_nuisance_sd * rng.standard_normal((n, k)) @ basis[:, d:].T
    spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -0.5
    spectrum *= np.sqrt(dim / np.sum(spectrum**2))  # mean square 1: content_noise_sd is per dim on average
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    noise = (prm.content_noise_sd * spectrum * rng.standard_normal((n, dim))) @ rotation
    x = signal + nuisance + noise  # (N, dim)
    x -= x.mean(axis=0)
    _, vectors = np.linalg.eigh(x.T @ x)
    vectors = vectors[:, ::-1]  # descending variance
    # eigh's signs are arbitrary; fix them so the largest loading of every axis is positive.
    vectors *= np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(dim)])
    x = x @ vectors
    x *= prm.content_top_std / x[:, 0].std()
    return np.concatenate([np.zeros((1, dim)), x])


@dataclass(frozen=True)
class PopularitySampler:
    """Draws item ids ∝ exp(power · log_pop) over the allowed items (cold ones and the padding excluded)."""

    cdf: np.ndarray  # (N+1,) cumulative weights by item id; disallowed items add 0

    @classmethod
    def build(cls, items: ItemTruth, power: float, allowed: np.ndarray) -> PopularitySampler:
        """allowed: (N+1,) bool."""
        w = np.where(allowed, np.exp(power * np.where(allowed, items.log_pop, 0.0)), 0.0)
        return cls(cdf=np.cumsum(w))

    def draw(self, u: np.ndarray) -> np.ndarray:
        """u: uniforms in [0, 1) of any shape -> item ids of that shape."""
        return np.searchsorted(self.cdf, u * self.cdf[-1], side="right")


def draw_by_interest(interest: np.ndarray, items: ItemTruth, sampler: PopularitySampler, beta: float,
                     proposals: int, rng: np.random.Generator) -> np.ndarray:
    """Approximately item ∝ pop^power · exp(beta <u, v_item>), one per row of interest (n, d) -> (n,) ids.

    Sampling-importance-resampling: `proposals` popularity draws per row, one kept by a Gumbel-max over
    beta·<u, v>; exact sampling over all N items would cost n·N.
    """
    out = np.empty(interest.shape[0], dtype=np.int64)
    for lo in range(0, out.size, SAMPLING_CHUNK):
        u = interest[lo : lo + SAMPLING_CHUNK]
        cand = sampler.draw(rng.random((u.shape[0], proposals)))  # (c, M)
        score = np.einsum("cd,cmd->cm", u, items.taste[cand])  # (c, M)
        gumbel = -np.log(-np.log(rng.random(cand.shape) + 1e-300))
        out[lo : lo + u.shape[0]] = cand[np.arange(cand.shape[0]), np.argmax(beta * score + gumbel, axis=1)]
    return out


def draw_series_member(items: ItemTruth, series: np.ndarray, u: np.ndarray) -> np.ndarray:
    """A uniformly chosen item of each given series (n,) -> (n,) ids; u: (n,) uniforms in [0, 1)."""
    start = items.series_start[series]
    size = items.series_start[series + 1] - start
    return items.series_members[start + np.minimum((u * size).astype(np.int64), size - 1)]
