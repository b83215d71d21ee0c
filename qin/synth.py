"""Demo data generator: the challenge's files and dtypes, drawn from a known process (see spec demo_data.md).

Because the process is known, every row's true click probability ``p_true`` is known, and so is the best AUC
any model can reach on it. `synthesize` writes::

    out_dir/MicroLens_1M_x1/{train,valid,test}.parquet, item_info.parquet
    out_dir/item_feature.parquet, item_emb.parquet, item_seq.parquet, item_images/<item_id>.jpg
    out_dir/hidden/{valid_truth,test_truth,item_latent}.parquet, meta.json   (never read by the solution)

Notation: N items (ids 1..N, 0 = padding), T tags (ids 1..T), K topics, U users, n rows, S stored history
length, d = d_lat latent dimension, Σ = total history slots over a set of rows (ragged).

The process (demo_data.md §2-3), in one paragraph: items have a topic, a unit latent vector v near their
topic centre, a Zipf popularity, tags drawn mostly from their topic's pool, and content vectors (BERT-like
768-d text, CLIP-like 1024-d image, a title, a cover image) made from a *content* latent that shares only
part of v's item-specific part. Users have 1-3 interest topics; their history is topic- and
popularity-driven with a few repeats. Each user gets 4 candidates (35% from the user's topics, 65% from
global popularity), labelled with y ~ Bernoulli(sigmoid(f)) where f is dominated by a sharp target
attention s_att = sum_j softmax_j(<v_t, v_hj>/tau - gamma*log(1+age_j)) <v_t, v_hj> and its product with
the target's quality q (interest match counts more for well-liked items).

Tuned AUCs, seed 0, as expected AUCs over all rows of all splits (label noise integrated out), from
`python benchmarks/signal_anatomy.py --size <size>`. "additive" is the best additive model of the TRUE
signals (a logistic regression on s_att, s_tag, s_rep, q, popularity, user and item bias, fitted on train,
scored on valid + test); "+ products" adds s_att·q and s_tag·q to it. Their gap is what modelling crosses
can win on this data at most; the generator is tuned so that it is about 0.01 (it was 0.0006 with the
earlier weights w_att 8, w_att_q 1, w_tag_q 0.8, under which no tower could gain from crosses).

    size  | oracle AUC* | popularity | s_att alone | additive | + products
    ------+-------------+------------+-------------+----------+-----------
    tiny  |    .948     |    .419    |    .707     |   .926   |   .947
    small |    .955     |    .606    |    .850     |   .943   |   .954
    bench |    .947     |    .599    |    .848     |   .936   |   .947
    full  |    .940     |    .550    |    .806     |   .922   |   .940

tiny is for plumbing only (8k rows: models stay far from the oracle; its popularity is even anti-correlated
with clicks, because popular candidates are rarely interest matches). Popularity alone falls as N grows
(long tail); w_pop is the spec's 0.2, which keeps small and bench near the real data's reported 0.58-0.62.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qin.errors import QinError

DATA_SUBDIR = "MicroLens_1M_x1"
HIDDEN_SUBDIR = "hidden"
IMAGES_SUBDIR = "item_images"
TXT_DIM = 768  # BERT-base width, as in txt_emb_BERT
IMG_DIM = 1024  # CLIP RN50 width, as in img_emb_CLIPRN50
EMB_DIM = 128  # item_emb_d128
N_ITEM_TAGS = 5  # item_info.item_tags is zero-padded to 5
CANDIDATES_PER_USER = 4  # ~3.6-4 rows per user in the real train split (data.md §1.1)
EMB_VARIANTS = ("item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4")


class SynthSize(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """Named data-set sizes (demo_data.md §5-6)."""

    tiny = "tiny"
    small = "small"
    bench = "bench"
    full = "full"


@dataclass(frozen=True)
class SizeSpec:
    """The dimensions of one size. Users per split = ceil(rows / CANDIDATES_PER_USER)."""

    n_items: int
    n_tags: int
    n_topics: int
    train_rows: int
    valid_rows: int
    test_rows: int
    seq_len: int  # S: stored (padded) length of item_seq
    max_len: int  # suggested model max_len (recorded in meta.json only)
    chunk_rows: int  # rows per parquet row group / per signal chunk (fixed, so output is deterministic)


SIZES: dict[SynthSize, SizeSpec] = {
    SynthSize.tiny: SizeSpec(1_000, 300, 16, 8_000, 1_000, 1_000, 20, 16, 50_000),
    SynthSize.small: SizeSpec(2_000, 600, 32, 60_000, 5_000, 5_000, 50, 32, 50_000),
    SynthSize.bench: SizeSpec(20_000, 2_000, 64, 500_000, 10_000, 50_000, 100, 64, 100_000),
    SynthSize.full: SizeSpec(91_717, 11_738, 64, 3_600_000, 10_000, 379_142, 100, 64, 200_000),
}
_SIZE_CODE = {SynthSize.tiny: 0, SynthSize.small: 1, SynthSize.bench: 2, SynthSize.full: 3}


@dataclass(frozen=True)
class SynthParams:
    """Every generator parameter (recorded whole in meta.json). Defaults are the tuned values."""

    # --- items
    d_lat: int = 16  # latent dimension of v_i
    item_noise: float = 0.5  # v_i = normalise(c_k + item_noise * eps), eps ~ N(0, I/d)
    content_rho: float = 0.5  # corr. between v's and the content latent's item-specific noise
    topic_zipf: float = 0.7  # topic sizes ∝ rank^-topic_zipf
    pop_zipf: float = 1.05  # item popularity ∝ rank^-pop_zipf
    level_noise: float = 0.3  # views_level = decile(log π + N(0, level_noise²))
    likes_shift_sd: float = 1.0  # likes_level = clip(round(views_level + N(0, sd²)), 0, 9)
    tag_count_p: tuple[float, ...] = (0.15, 0.25, 0.25, 0.20, 0.15)  # P(1..5 tags)
    tag_from_topic: float = 0.6  # share of an item's tags drawn from its topic's pool (lower: s_tag weaker)
    tag_pool_skew: float = 1.5  # within a pool, tag = floor(u^skew * pool size): >1 makes a few tags common
    txt_noise: float = 0.35  # per-dim noise sd of txt_emb_BERT (per-dim signal sd is 1/sqrt(d) = 0.25)
    img_noise: float = 0.45  # per-dim noise of img_emb_CLIPRN50
    img_nuisance_dim: int = 8  # image factors unrelated to clicks (lighting, framing)
    variant_noise: tuple[float, ...] = (0.35, 0.25, 0.08, 0.5)  # item_emb v1, v2, v3, e4 (v3 least noisy)
    p_empty_title: float = 0.01
    p_missing_image: float = 0.01
    image_px: int = 32
    # --- users and histories
    user_topic_p: tuple[float, ...] = (0.5, 0.35, 0.15)  # P(1, 2, 3 interest topics)
    user_bias_sd: float = 0.3  # b_u
    hist_mean: float = 8.0  # L = 1 + NegBin(mean hist_mean, dispersion), clipped to S
    hist_dispersion: float = 1.5
    p_hist_topic: float = 0.7  # a history item comes from one of the user's topics with this prob.
    p_repeat: float = 0.05  # ... and repeats an earlier history item with this prob.
    hist_pop_power: float = 1.0  # history items are drawn ∝ π^power (in a topic or globally)
    prefixes_per_user: int = 6  # item_seq.parquet rows per user (the last few prefixes of the history)
    # --- candidates and label function f (demo_data.md §3)
    p_topic_candidate: float = 0.35
    # Candidates are drawn from a flatter law than histories: with π itself the top item would be ~15% of
    # all rows; with π^0.75 it is 3-7% and nearly every item is a target somewhere (as in the real data).
    cand_pop_power: float = 0.75  # global candidates are drawn ∝ π^power
    topic_cand_pop_power: float = 0.75  # topic candidates are drawn within the topic ∝ π^power
    tau: float = 0.15
    gamma: float = 0.5
    # How s_att pools the history. "softmax": the spec's sharp softmax (weights sum to 1). "relu": a
    # diagnostic alternative shaped like QIN's ASTA, sparse and unnormalised: weight_j = ReLU(<v_t, v_hj> -
    # relu_threshold) (1 + age_j)^-gamma, s_att = relu_scale * sum_j weight_j <v_t, v_hj>.
    attention: str = "softmax"
    relu_threshold: float = 0.5
    relu_scale: float = 1.0
    # The cross terms must be worth something beyond their main effects: s_att is mostly positive, so
    # s_att·q ≈ mean(s_att)·q + a small true interaction, and an additive model refits the first part.
    # With the earlier 8.0 / 1.0 / 0.8, refitting the signals additively lost only 0.0006 AUC to the oracle
    # (benchmarks/signal_anatomy.py), so no tower could gain by modelling crosses. 5 / 6 / 3 keeps the
    # oracle at ≈ 0.95 and makes the best additive model of the true signals ≈ 0.011 worse than one with the
    # two products: interest match matters much more for well-liked items.
    w_att: float = 5.0  # spec's 3.0 (with the spec's crosses) gave oracle AUC ≈ 0.86
    w_att_q: float = 6.0
    w_tag_q: float = 3.0
    w_rep: float = 0.6
    w_q: float = 0.25
    w_pop: float = 0.2  # the spec's value: popularity-alone AUC ≈ 0.55-0.61 (small 0.61, full 0.55)
    item_bias_sd: float = 0.3  # w_item[t]: only an item-ID embedding can learn it
    target_rate: float = 0.25  # β0 is bisected so that mean p_true over all rows equals this

    def __post_init__(self) -> None:
        if self.attention not in ("softmax", "relu"):
            raise QinError(f"SynthParams.attention must be 'softmax' or 'relu', got {self.attention!r}")


DEFAULT_PARAMS = SynthParams()


def params_with(assignments: list[str], base: SynthParams = DEFAULT_PARAMS) -> SynthParams:
    """`base` with NAME=VALUE overrides of its float and str fields (for exploring the generator).

    Raises:
        QinError: an assignment without '=', an unknown or non-scalar field, or a value of the wrong type.
    """
    params = base
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        default = getattr(base, name, None)
        if not sep or not isinstance(default, float | str):
            raise QinError(f"generator parameter {assignment!r}: expected NAME=VALUE with NAME a float or "
                           "str field of SynthParams")
        try:
            params = replace(params, **{name: type(default)(value)})
        except ValueError:
            raise QinError(f"generator parameter {assignment!r}: {value!r} is not a "
                           f"{type(default).__name__}") from None
    return params


@dataclass(frozen=True)
class SynthResult:
    """Where `synthesize` wrote: ``data_dir`` (= out_dir), ``hidden_dir``, and meta.json's content."""

    data_dir: Path
    hidden_dir: Path
    meta: dict


# ---------------------------------------------------------------------------------------------------------
# Randomness: one PCG64 stream per purpose, keyed by (seed, size, purpose) so that adding a stream or
# reordering stages never shifts the numbers of another.


def _rng(seed: int, size: SynthSize, purpose: str) -> np.random.Generator:
    """An independent generator for one purpose (e.g. "items.topic")."""
    key = [seed, _SIZE_CODE[size], zlib.crc32(purpose.encode())]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


# ---------------------------------------------------------------------------------------------------------
# Metrics


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


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """roc_auc_score, or NaN when y has a single class (possible on very small splits)."""
    from sklearn.metrics import roc_auc_score  # imported here: sklearn adds ~1 s to `import qin.synth`

    if y.min() == y.max():
        return float("nan")
    return float(roc_auc_score(y, score))


# ---------------------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class _Items:
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


def _make_items(spec: SizeSpec, prm: SynthParams, seed: int, size: SynthSize) -> _Items:
    """Draw topics, latent vectors, popularity, levels, tags and item biases."""
    n, k, d = spec.n_items, spec.n_topics, prm.d_lat
    rng = _rng(seed, size, "items")
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
    return _Items(
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
class _Sampler:
    """Draws items ∝ π^power, globally or within a given topic (by inverse CDF, fully vectorised)."""

    cdf: np.ndarray  # (N,) CDF over items 1..N
    order: np.ndarray  # (N,) item ids sorted by topic
    key: np.ndarray  # (N,) topic + within-topic CDF: increasing, so (k, u) → searchsorted(key, k + u)

    @staticmethod
    def build(items: _Items, power: float) -> _Sampler:
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
        return _Sampler(cdf=cdf / cdf[-1], order=order + 1, key=t_sorted + within)

    def in_topics(self, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
        """One item per row from the given topics (m,), for uniforms u (m,) in [0, 1). Returns (m,) ids."""
        pos = np.searchsorted(self.key, topics + u, side="right")
        return self.order[np.minimum(pos, self.order.size - 1)]

    def globally(self, u: np.ndarray) -> np.ndarray:
        """One item per uniform u (m,). Returns (m,) ids."""
        return np.minimum(np.searchsorted(self.cdf, u, side="right"), self.cdf.size - 1) + 1


# ---------------------------------------------------------------------------------------------------------
# Item content: text/image vectors, titles, cover images


def _content_vectors(items: _Items, prm: SynthParams, empty_title: np.ndarray, seed: int,
                     size: SynthSize) -> tuple[np.ndarray, np.ndarray]:
    """txt_emb_BERT = A_t·c_i + noise, img_emb_CLIPRN50 = A_v·[c_i, nuisance_i] + noise (c = content latent).

    Items with an empty title get the "empty string" text vector (a constant) plus noise, like a real
    encoder fed "".

    Returns:
        txt (N, 768) float32, img (N, 1024) float32 for items 1..N.
    """
    rng = _rng(seed, size, "content")
    c = items.content[1:]  # (N, d)
    n, d = c.shape
    a_t = (rng.standard_normal((d, TXT_DIM)) / np.sqrt(d)).astype(np.float32)  # (d, 768)
    a_v = (rng.standard_normal((d + prm.img_nuisance_dim, IMG_DIM)) / np.sqrt(d)).astype(np.float32)
    txt = c @ a_t  # (N, 768)
    empty_vec = (rng.standard_normal(TXT_DIM) / np.sqrt(d)).astype(np.float32)
    txt[empty_title] = empty_vec
    txt += np.float32(prm.txt_noise) * rng.standard_normal((n, TXT_DIM), dtype=np.float32)
    nuisance = (rng.standard_normal((n, prm.img_nuisance_dim)) / np.sqrt(d)).astype(np.float32)
    img = np.concatenate([c, nuisance], axis=1) @ a_v  # (N, 1024)
    img += np.float32(prm.img_noise) * rng.standard_normal((n, IMG_DIM), dtype=np.float32)
    return txt, img


def _pca(x_parts: tuple[np.ndarray, ...], dim: int) -> np.ndarray:
    """PCA of the column-concatenation of x_parts (no whitening), as the organisers' sklearn PCA(128).

    Exact, by an eigendecomposition of the smaller of the covariance (D x D) and the Gram matrix (N x N),
    keeping only the top ``dim`` eigenpairs (LAPACK's MRRR driver: several times faster than a full eigh).

    Args:
        x_parts: arrays (N, D_p); their concatenation X is (N, D).

    Returns:
        (N, dim) float64 scores (X - mean) @ W. Each component's sign is fixed (largest |loading| in W
        positive), so the result does not depend on the eigen-solver's sign choice.
    """
    from scipy.linalg import eigh  # scipy comes with scikit-learn

    n = x_parts[0].shape[0]
    mean = np.concatenate([p.mean(axis=0, dtype=np.float64) for p in x_parts])  # (D,)
    width = mean.size
    step = 8192  # rows per block: bounds the float64 copy to ~120 MB at D=1792

    def blocks() -> Iterator[tuple[slice, np.ndarray]]:
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            yield sl, np.concatenate([p[sl] for p in x_parts], axis=1).astype(np.float64) - mean

    if n < width:  # few items (tiny/small): eigenvectors of the Gram matrix, mapped back to loadings
        xc = np.concatenate([blk for _, blk in blocks()])  # (N, D)
        evals, evecs = eigh(xc @ xc.T, subset_by_index=[n - dim, n - 1], driver="evr")  # ascending
        comps = xc.T @ evecs[:, ::-1] / np.sqrt(np.maximum(evals[::-1], 1e-300))  # (D, dim) unit columns
    else:
        cov = np.zeros((width, width), dtype=np.float64)
        for _, blk in blocks():
            cov += blk.T @ blk
        evals, evecs = eigh(cov, subset_by_index=[width - dim, width - 1], driver="evr")
        comps = evecs[:, ::-1]  # (D, dim), by decreasing variance
    comps = comps * np.sign(comps[np.argmax(np.abs(comps), axis=0), np.arange(dim)])
    out = np.empty((n, dim), dtype=np.float64)
    for sl, blk in blocks():
        out[sl] = blk @ comps
    return out


def _emb_variants(items: _Items, prm: SynthParams, seed: int, size: SynthSize) -> list[np.ndarray]:
    """The four item_emb.parquet variants: random 128-d re-projections of v (the click latent) + noise.

    They stand for organiser-made embeddings trained on behaviour (item_seq), which is why they carry the
    click latent v rather than the content latent; v3 has the least noise.

    Returns:
        4 arrays (N, 128) float32.
    """
    rng = _rng(seed, size, "emb_variants")
    v = items.v[1:]
    n, d = v.shape
    out = []
    for noise in prm.variant_noise:
        proj = (rng.standard_normal((d, EMB_DIM)) / np.sqrt(d)).astype(np.float32)
        out.append(v @ proj + np.float32(noise / np.sqrt(EMB_DIM / d)) *
                   rng.standard_normal((n, EMB_DIM), dtype=np.float32))
    return out


# Word lists for titles: one theme per topic (cycled); topics that share a theme differ by their own
# two made-up words. English-ish so that a small text encoder can see the topics.
_THEMES: tuple[tuple[str, ...], ...] = (
    ("cat", "kitten", "paw", "meow", "purr", "whiskers", "fluffy", "pets"),
    ("dog", "puppy", "bark", "leash", "fetch", "doggo", "walkies", "woof"),
    ("pasta", "recipe", "cooking", "kitchen", "sauce", "garlic", "dinner", "food"),
    ("cake", "baking", "dessert", "chocolate", "cream", "sweet", "oven", "bake"),
    ("football", "goal", "match", "striker", "league", "stadium", "kick", "soccer"),
    ("basketball", "dunk", "court", "hoops", "rebound", "nba", "buzzer", "ball"),
    ("guitar", "chords", "song", "acoustic", "riff", "strum", "cover", "music"),
    ("piano", "melody", "keys", "classical", "sonata", "chopin", "recital", "piano"),
    ("makeup", "lipstick", "tutorial", "eyeliner", "glow", "skincare", "beauty", "look"),
    ("fashion", "outfit", "style", "dress", "sneakers", "streetwear", "haul", "ootd"),
    ("travel", "beach", "island", "sunset", "flight", "vacation", "trip", "wanderlust"),
    ("mountain", "hiking", "trail", "summit", "camping", "forest", "tent", "outdoors"),
    ("game", "gaming", "boss", "level", "speedrun", "controller", "stream", "gamer"),
    ("anime", "manga", "cosplay", "episode", "otaku", "character", "fanart", "anime"),
    ("car", "engine", "drift", "racing", "turbo", "garage", "supercar", "cars"),
    ("phone", "unboxing", "review", "gadget", "camera", "battery", "specs", "tech"),
    ("dance", "choreo", "moves", "kpop", "routine", "challenge", "rhythm", "dance"),
    ("workout", "gym", "squat", "cardio", "muscle", "protein", "fitness", "gains"),
    ("baby", "toddler", "giggle", "parenting", "family", "firststeps", "cute", "baby"),
    ("comedy", "prank", "funny", "joke", "skit", "laugh", "meme", "lol"),
    ("painting", "canvas", "brush", "watercolor", "sketch", "drawing", "artist", "art"),
    ("garden", "flowers", "plants", "seeds", "bloom", "harvest", "soil", "garden"),
    ("fishing", "lake", "bait", "catch", "river", "boat", "trout", "fishing"),
    ("science", "experiment", "chemistry", "physics", "lab", "reaction", "atoms", "science"),
    ("history", "ancient", "empire", "castle", "war", "dynasty", "museum", "history"),
    ("coffee", "latte", "espresso", "barista", "beans", "brew", "cafe", "coffee"),
    ("street", "snack", "noodles", "dumplings", "spicy", "vendor", "market", "streetfood"),
    ("wedding", "bride", "ring", "ceremony", "vows", "bouquet", "groom", "wedding"),
    ("horse", "riding", "saddle", "gallop", "stable", "pony", "equestrian", "horses"),
    ("space", "rocket", "planet", "galaxy", "astronaut", "nasa", "orbit", "space"),
    ("diy", "crafts", "glue", "handmade", "woodwork", "upcycle", "tools", "diy"),
    ("study", "exam", "notes", "homework", "school", "campus", "studytips", "study"),
)
_FILLER = ("today", "my", "new", "best", "look", "this", "video", "wow", "so", "the", "first", "day",
           "with", "love", "time", "fun", "omg", "part", "vlog", "episode")
_SYLL = ("ka", "lo", "mi", "ren", "to", "va", "shi", "zu", "ne", "por", "qui", "dal", "fe", "gor", "bi",
         "xan")


def _topic_words(k: int) -> tuple[list[str], list[str]]:
    """(topic words, hashtag) per topic: the theme's first 7 words + 2 made-up words; hashtag = 8th word."""
    words, tags = [], []
    for t in range(k):
        theme = _THEMES[t % len(_THEMES)]
        a, b = divmod(t * 7 + 3, len(_SYLL))
        made = [_SYLL[a % len(_SYLL)] + _SYLL[b] + _SYLL[(t + 5) % len(_SYLL)],
                _SYLL[(t * 3 + 1) % len(_SYLL)] + _SYLL[(a + b) % len(_SYLL)]]
        words.append(list(theme[:7]) + made)
        tags.append("#" + theme[7] + (str(t // len(_THEMES)) if t >= len(_THEMES) else ""))
    return words, tags


def _titles(items: _Items, k: int, empty: np.ndarray, seed: int, size: SynthSize) -> pa.Array:
    """Titles of 3-8 words (75% topic words, 25% filler) plus the topic's hashtag, built without a row loop.

    Returns:
        pa.string() array (N,); items flagged in ``empty`` (N,) get "".
    """
    rng = _rng(seed, size, "titles")
    n = items.topic.size - 1
    topic = items.topic[1:]
    words, hashtags = _topic_words(k)
    per_topic = len(words[0])
    vocab = [w for ws in words for w in ws] + list(_FILLER) + hashtags  # one flat vocabulary
    filler0, hash0 = k * per_topic, k * per_topic + len(_FILLER)
    n_words = rng.integers(3, 9, size=n)  # 3..8 words
    n_words[empty] = 0
    width = 9  # 8 words + hashtag
    tok = np.where(rng.random((n, width)) < 0.75,
                   topic[:, None] * per_topic + rng.integers(0, per_topic, size=(n, width)),
                   filler0 + rng.integers(0, len(_FILLER), size=(n, width)))
    tok[np.arange(n), np.minimum(n_words, width - 1)] = hash0 + topic  # hashtag right after the words
    n_tok = np.where(empty, 0, n_words + 1)
    keep = np.arange(width)[None, :] < n_tok[:, None]  # (N, 9)
    flat = pa.array(vocab).take(pa.array(tok[keep]))
    offsets = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), flat)
    return pc.binary_join(lists, " ")


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV→RGB. Inputs (m,) in [0, 1]; returns (m, 3) float in [0, 1]."""
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, axis=-1) for c in
                      [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]])  # (6, m, 3)
    return table[i, np.arange(h.size)]


def _cover_images(items: _Items, ids: np.ndarray, px: int, rng: np.random.Generator) -> np.ndarray:
    """Cover images whose colours and shape depend on the topic, and position/size on the content latent.

    Args:
        ids: (m,) item ids.

    Returns:
        (m, px, px, 3) uint8.
    """
    topic = items.topic[ids]
    c = items.content[ids].astype(np.float64)  # components ~ N(0, 1/d): scaled by 4 below to vary visibly
    hue = (topic * 0.6180339887) % 1.0
    bg = _hsv_to_rgb(hue, np.full(hue.shape, 0.35), np.full(hue.shape, 0.92))  # (m, 3)
    fg = _hsv_to_rgb((hue + 0.5) % 1.0, np.full(hue.shape, 0.85), 0.55 + 0.125 * (np.tanh(4 * c[:, 3]) + 1))
    grid = (np.arange(px) + 0.5) / px * 2 - 1
    y, x = grid[None, :, None], grid[None, None, :]  # (1, px, 1), (1, 1, px)
    cx, cy = 0.3 * np.tanh(4 * c[:, 0])[:, None, None], 0.3 * np.tanh(4 * c[:, 1])[:, None, None]
    r = (0.45 + 0.15 * np.tanh(4 * c[:, 2]))[:, None, None]
    dx, dy = x - cx, y - cy  # (m, px, px)
    shapes = [
        dx**2 + dy**2 < r**2,  # disc
        np.maximum(np.abs(dx), np.abs(dy)) < r * 0.85,  # square
        (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2),  # triangle
        np.sin(dy * 9.0) > 0,  # horizontal stripes
        np.sin(dx * 9.0) > 0,  # vertical stripes
        (dx**2 + dy**2 < r**2) & (dx**2 + dy**2 > (r * 0.55) ** 2),  # ring
        np.abs(dx) + np.abs(dy) < r,  # diamond
        (np.minimum(np.abs(dx), np.abs(dy)) < r / 3) & (np.maximum(np.abs(dx), np.abs(dy)) < r),  # cross
    ]
    kind = topic % len(shapes)
    mask = np.choose(kind[:, None, None], shapes)  # (m, px, px)
    img = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :]) * 255.0
    img += rng.normal(0.0, 8.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write_images(items: _Items, folder: Path, present: np.ndarray, prm: SynthParams, seed: int,
                  size: SynthSize, on_chunk: Callable[[int], None]) -> None:
    """Write <item_id>.jpg for items with ``present`` (N+1,) True; in chunks, file writes in 4 threads."""
    from PIL import Image  # imported here: only this stage needs Pillow

    folder.mkdir(parents=True)
    ids_all = np.nonzero(present)[0]
    step = 4096

    def save(arr: np.ndarray, item_id: int) -> None:
        Image.fromarray(arr).save(folder / f"{item_id}.jpg", format="JPEG", quality=90)

    with ThreadPoolExecutor(max_workers=4) as pool:  # PIL and file I/O release the GIL
        for ci, lo in enumerate(range(0, ids_all.size, step)):
            ids = ids_all[lo : lo + step]
            imgs = _cover_images(items, ids, prm.image_px, _rng(seed, size, f"images.{ci}"))
            list(pool.map(save, imgs, ids.tolist()))
            on_chunk(ids.size)


# ---------------------------------------------------------------------------------------------------------
# Users and histories


@dataclass(frozen=True)
class _Users:
    """User-level truth for all splits (train users first, then valid, then test)."""

    user_id: np.ndarray  # (U,) int64, distinct ids ≥ 1 (a permutation, so splits interleave in id)
    topics: np.ndarray  # (U, 3) int64 interest topics (unused slots repeat the first)
    weights: np.ndarray  # (U, 3) float64 topic weights (0 for unused slots), rows sum to 1
    bias: np.ndarray  # (U,) float64 b_u
    hist_len: np.ndarray  # (U,) int64 L_u in 1..S
    hist_off: np.ndarray  # (U+1,) int64 offsets into hist_flat
    hist_flat: np.ndarray  # (Σ L,) int64 item ids, oldest first within each user
    recent_tags: np.ndarray  # (U, 25) int64 distinct tags of the last 5 history items, zeros elsewhere


def _make_users(n_users: int, items: _Items, spec: SizeSpec, prm: SynthParams, seed: int,
                size: SynthSize) -> _Users:
    """Draw users' interests, biases and histories (ragged, oldest first)."""
    rng = _rng(seed, size, "users")
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
    slot_topic = topics[owner, _pick_slot(w[owner], rng.random(total))]
    from_topic = rng.random(total) < prm.p_hist_topic
    u = rng.random(total)
    sampler = _Sampler.build(items, prm.hist_pop_power)
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
    return _Users(user_id=rng.permutation(n_users).astype(np.int64) + 1, topics=topics, weights=w, bias=bias,
                  hist_len=hist_len.astype(np.int64), hist_off=hist_off.astype(np.int64), hist_flat=hist,
                  recent_tags=np.sort(tg, axis=1))


def _pick_slot(weights: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Index 0..2 drawn from per-row weights (m, 3) with uniforms u (m,) in [0, 1).

    u is scaled by each row's own total, so rounding can never select a trailing zero-weight slot.
    """
    cum = np.cumsum(weights, axis=1)  # (m, 3)
    return (u[:, None] * cum[:, -1:] >= cum).sum(axis=1)


def _padded_history(users: _Users, rows_user: np.ndarray, seq_len: int) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------------------
# Candidates, signals and labels


@dataclass(frozen=True)
class _Rows:
    """All impression rows of all splits (split 0 = train, 1 = valid, 2 = test), in output order."""

    split: np.ndarray  # (n,) int8
    user: np.ndarray  # (n,) int64 user index into _Users arrays
    item: np.ndarray  # (n,) int64 target item id
    s_att: np.ndarray  # (n,) float64
    s_rep: np.ndarray  # (n,) float64
    s_tag: np.ndarray  # (n,) float64
    f_raw: np.ndarray  # (n,) float64 logit without β0


def _candidates(split_users: list[np.ndarray], split_rows: list[int], users: _Users, items: _Items,
                prm: SynthParams, seed: int, size: SynthSize) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (user, target): 4 per user, 35% from the user's topics and 65% from global popularity.

    Rows of a split are shuffled (so a user's rows are not adjacent) and cut to the split's row count.

    Returns:
        split (n,) int8, user (n,) int64, item (n,) int64.
    """
    rng = _rng(seed, size, "candidates")
    s_all, u_all = [], []
    for s, (us, n_rows) in enumerate(zip(split_users, split_rows, strict=True)):
        ru = np.repeat(us, CANDIDATES_PER_USER)[:n_rows]
        u_all.append(ru[rng.permutation(n_rows)])
        s_all.append(np.full(n_rows, s, dtype=np.int8))
    user = np.concatenate(u_all)
    n = user.size
    topic = users.topics[user, _pick_slot(users.weights[user], rng.random(n))]
    u = rng.random(n)
    by_topic = _Sampler.build(items, prm.topic_cand_pop_power).in_topics(topic, u)
    by_pop = _Sampler.build(items, prm.cand_pop_power).globally(u)
    item = np.where(rng.random(n) < prm.p_topic_candidate, by_topic, by_pop)
    return np.concatenate(s_all), user, item


def _signals(user: np.ndarray, item: np.ndarray, users: _Users, items: _Items,
             prm: SynthParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """s_att, s_rep, s_tag for a chunk of rows, over the ragged history slots (no padding is touched).

    Args:
        user: (n,) user indices.  item: (n,) target item ids.

    Returns:
        s_att (n,), s_rep (n,), s_tag (n,) float64.
    """
    n = user.size
    L = users.hist_len[user]  # (n,) all ≥ 1, so no empty segment in reduceat
    starts = np.cumsum(L) - L
    rep = np.repeat(np.arange(n), L)  # (Σ,) row of each slot
    within = np.arange(rep.size) - starts[rep]
    slot_item = users.hist_flat[users.hist_off[user][rep] + within]  # (Σ,)
    age = (L[rep] - 1 - within).astype(np.float64)  # 0 = most recent
    sim = np.einsum("ij,ij->i", items.v[item][rep], items.v[slot_item], dtype=np.float64)  # (Σ,)
    if prm.attention == "relu":
        weight = np.maximum(sim - prm.relu_threshold, 0.0) * np.exp(-prm.gamma * np.log1p(age))  # (Σ,)
        s_att = prm.relu_scale * np.add.reduceat(weight * sim, starts)
    else:
        logit = sim / prm.tau - prm.gamma * np.log1p(age)
        e = np.exp(logit - np.maximum.reduceat(logit, starts)[rep])
        s_att = np.add.reduceat(e * sim, starts) / np.add.reduceat(e, starts)
    s_rep = np.maximum.reduceat((slot_item == item[rep]).astype(np.float64), starts)

    tt = items.tags[item]  # (n, 5)
    rt = users.recent_tags[user]  # (n, 25)
    inter = ((tt[:, :, None] == rt[:, None, :]) & (tt[:, :, None] != 0)).any(axis=2).sum(axis=1)
    union = (tt != 0).sum(axis=1) + (rt != 0).sum(axis=1) - inter
    s_tag = inter / np.maximum(union, 1)
    return s_att, s_rep, s_tag


def _raw_logit(s_att: np.ndarray, s_rep: np.ndarray, s_tag: np.ndarray, user: np.ndarray, item: np.ndarray,
               users: _Users, items: _Items, prm: SynthParams) -> np.ndarray:
    """f − β0 (demo_data.md §3). All inputs (n,); returns (n,) float64."""
    q = items.quality[item]
    return (prm.w_att * s_att + prm.w_att_q * s_att * q + prm.w_tag_q * s_tag * q + prm.w_rep * s_rep
            + prm.w_q * q + prm.w_pop * items.pop_z[item] + users.bias[user] + items.w_item[item])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def _bisect_beta0(f_raw: np.ndarray, target: float) -> float:
    """β0 such that mean(sigmoid(f_raw + β0)) == target (to 1e-10)."""
    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _sigmoid(f_raw + mid).mean() < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def _make_rows(spec: SizeSpec, users: _Users, items: _Items, prm: SynthParams, seed: int,
               size: SynthSize, split_users: list[np.ndarray]) -> _Rows:
    """Candidates plus their signals and raw logits, computed in fixed-size chunks."""
    split_rows = [spec.train_rows, spec.valid_rows, spec.test_rows]
    split, user, item = _candidates(split_users, split_rows, users, items, prm, seed, size)
    n = user.size
    s_att, s_rep, s_tag = np.empty(n), np.empty(n), np.empty(n)
    for lo in range(0, n, spec.chunk_rows):
        sl = slice(lo, lo + spec.chunk_rows)
        s_att[sl], s_rep[sl], s_tag[sl] = _signals(user[sl], item[sl], users, items, prm)
    f_raw = _raw_logit(s_att, s_rep, s_tag, user, item, users, items, prm)
    return _Rows(split=split, user=user, item=item, s_att=s_att, s_rep=s_rep, s_tag=s_tag, f_raw=f_raw)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _list_array(flat: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
    """A plain list<value_type> array of rows of fixed ``width`` from a flat buffer (n*width,)."""
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), width)
    return fixed.cast(pa.list_(value_type))


def _ragged_list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> array from a flat buffer and per-row lengths (n,)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


_ROW_FIELDS = [
    pa.field("user_id", pa.int64()),
    pa.field("item_seq", pa.list_(pa.int64())),
    pa.field("item_id", pa.int64()),
    pa.field("likes_level", pa.int64()),
    pa.field("views_level", pa.int64()),
]


def _write_split(path: Path, idx: np.ndarray, labels: np.ndarray | None, with_id: bool, rows: _Rows,
                 users: _Users, items: _Items, spec: SizeSpec, on_chunk: Callable[[int], None]) -> None:
    """Write one of train/valid/test in row groups of spec.chunk_rows.

    Args:
        idx: (n,) indices into ``rows`` in output order.  labels: (n,) float64 or None (no label column).
    """
    fields = ([pa.field("ID", pa.int64())] if with_id else []) + _ROW_FIELDS
    if labels is not None:
        fields.append(pa.field("label", pa.float64()))
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, idx.size, spec.chunk_rows):
            ci = idx[lo : lo + spec.chunk_rows]
            t = rows.item[ci]
            cols: list[pa.Array] = []
            if with_id:
                cols.append(pa.array(np.arange(lo, lo + ci.size, dtype=np.int64)))
            seq = _padded_history(users, rows.user[ci], spec.seq_len)  # (c, S)
            cols += [pa.array(users.user_id[rows.user[ci]]),
                     _list_array(seq.ravel(), spec.seq_len, pa.int64()),
                     pa.array(t), pa.array(items.likes_level[t]), pa.array(items.views_level[t])]
            if labels is not None:
                cols.append(pa.array(labels[lo : lo + ci.size]))
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))
            on_chunk(ci.size)


def _write_item_seq(path: Path, users: _Users, prm: SynthParams) -> int:
    """item_seq.parquet: for every user (in user_id order), the last few prefixes of the history.

    Lists are unpadded (variable length, oldest first). Returns the number of rows written.
    """
    schema = pa.schema([pa.field("user_id", pa.int64()), pa.field("item_seq", pa.list_(pa.int64()))])
    order = np.argsort(users.user_id)
    written = 0
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for lo in range(0, order.size, 100_000):
            us = order[lo : lo + 100_000]
            L = users.hist_len[us]
            m = np.minimum(L, prm.prefixes_per_user)  # prefixes per user
            ru = np.repeat(np.arange(us.size), m)  # (R,) row → user position
            k = np.arange(ru.size) - np.repeat(np.cumsum(m) - m, m)
            plen = L[ru] - m[ru] + 1 + k  # prefix lengths, increasing within a user  (R,)
            rr = np.repeat(np.arange(ru.size), plen)
            within = np.arange(rr.size) - np.repeat(np.cumsum(plen) - plen, plen)
            flat = users.hist_flat[users.hist_off[us[ru]][rr] + within]
            table = pa.Table.from_arrays(
                [pa.array(users.user_id[us[ru]]), _ragged_list_array(flat, plen, pa.int64())], schema=schema)
            writer.write_table(table)
            written += ru.size
    return written


def _write_items(folder: Path, items: _Items, titles: pa.Array, txt: np.ndarray, img: np.ndarray,
                 emb: np.ndarray, variants: list[np.ndarray]) -> None:
    """item_info.parquet (row 0 = padding), item_feature.parquet and item_emb.parquet."""
    n = items.topic.size - 1
    ids = np.arange(n + 1, dtype=np.int64)
    emb0 = np.concatenate([np.zeros((1, EMB_DIM)), emb])  # (N+1, 128) float64
    info = pa.table({"item_id": ids,
                     "item_tags": _list_array(items.tags.ravel(), N_ITEM_TAGS, pa.int64()),
                     "item_emb_d128": _list_array(emb0.ravel(), EMB_DIM, pa.float64())})
    pq.write_table(info, folder / DATA_SUBDIR / "item_info.parquet", compression="zstd")

    tags = items.tags[1:]
    n_tags = (tags != 0).sum(axis=1)
    schema = pa.schema([
        pa.field("item_id", pa.int64()), pa.field("item_title", pa.string()),
        pa.field("item_tags", pa.list_(pa.int64())), pa.field("likes_level", pa.int64()),
        pa.field("views_level", pa.int64()), pa.field("txt_emb_BERT", pa.list_(pa.float32())),
        pa.field("img_emb_CLIPRN50", pa.list_(pa.float32()))])
    step = 16384  # ~115 MB of vectors per row group
    with pq.ParquetWriter(folder / "item_feature.parquet", schema, compression="zstd") as writer:
        for lo in range(0, n, step):
            sl = slice(lo, lo + step)
            m = tags[sl].shape[0]
            cols = [pa.array(ids[1:][sl]), titles.slice(lo, m),
                    _ragged_list_array(tags[sl][tags[sl] != 0], n_tags[sl], pa.int64()),
                    pa.array(items.likes_level[1:][sl]), pa.array(items.views_level[1:][sl]),
                    _list_array(txt[sl].ravel(), TXT_DIM, pa.float32()),
                    _list_array(img[sl].ravel(), IMG_DIM, pa.float32())]
            writer.write_table(pa.Table.from_arrays(cols, schema=schema))

    cols = {"item_id": ids[1:]}
    for name, arr in zip(EMB_VARIANTS, variants, strict=True):
        cols[name] = _list_array(arr.ravel(), EMB_DIM, pa.float32())
    pq.write_table(pa.table(cols), folder / "item_emb.parquet", compression="zstd")


def _write_hidden(folder: Path, items: _Items, p_valid: np.ndarray, p_test: np.ndarray,
                  y_test: np.ndarray) -> None:
    """Truth files: valid p_true by row, test label and p_true by ID, and item latents for analysis."""
    pq.write_table(pa.table({"row": np.arange(p_valid.size, dtype=np.int64), "p_true": p_valid}),
                   folder / "valid_truth.parquet")
    ids = np.arange(p_test.size, dtype=np.int64)
    pq.write_table(pa.table({"ID": ids, "label": y_test, "p_true": p_test}),
                   folder / "test_truth.parquet")
    n = items.topic.size - 1
    pq.write_table(pa.table({
        "item_id": np.arange(1, n + 1, dtype=np.int64),
        "topic": items.topic[1:],
        "log_pop": items.log_pop[1:],
        "w_item": items.w_item[1:],
        "v": _list_array(items.v[1:].ravel(), items.v.shape[1], pa.float32()),
        "content": _list_array(items.content[1:].ravel(), items.v.shape[1], pa.float32()),
    }), folder / "item_latent.parquet", compression="zstd")


# ---------------------------------------------------------------------------------------------------------
# Orchestration


_OUTPUTS = (DATA_SUBDIR, "item_feature.parquet", "item_emb.parquet", "item_seq.parquet", IMAGES_SUBDIR,
            HIDDEN_SUBDIR)


def _check_out_dir(out_dir: Path) -> None:
    """Refuse paths we must not write to, before any work is done."""
    if out_dir.exists() and not out_dir.is_dir():
        raise QinError(f"synth: output folder {out_dir} exists and is a file; pass a folder path")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise QinError(f"synth: cannot create {out_dir}: {parent} is a file")
            break
    # Never replace a real data set (one that qin synth did not write) with demo data.
    if (out_dir / DATA_SUBDIR).exists() and not (out_dir / HIDDEN_SUBDIR / "meta.json").exists():
        raise QinError(f"synth: {out_dir / DATA_SUBDIR} exists but was not written by `qin synth` "
                       f"(no {HIDDEN_SUBDIR}/meta.json); refusing to overwrite it, choose another folder")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs from tmp into out_dir, replacing older ones (each move is a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trash = tmp / ".old"
    trash.mkdir()
    for name in _OUTPUTS:  # first move every old output aside, so old and new never mix...
        if (out_dir / name).exists() or (out_dir / name).is_symlink():
            os.replace(out_dir / name, trash / name)
    for name in _OUTPUTS:  # ...then move the new ones in
        if (tmp / name).exists():
            os.replace(tmp / name, out_dir / name)


def _split_users(spec: SizeSpec) -> list[np.ndarray]:
    """User index ranges of train, valid and test (disjoint), ceil(rows / 4) users each."""
    counts = [-(-r // CANDIDATES_PER_USER) for r in (spec.train_rows, spec.valid_rows, spec.test_rows)]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]


def synthesize(out_dir: Path, size: SynthSize, seed: int = 0, test_label: bool = False, images: bool = True,
               progress: bool = True) -> SynthResult:
    """Generate a demo data set with the challenge's layout and a known best-possible AUC.

    Args:
        out_dir: folder that receives MicroLens_1M_x1/, item_*.parquet, item_images/ and hidden/. Those
            entries are replaced as a whole; other files in the folder are left alone.
        size: tiny / small / bench / full (see SIZES).
        seed: any int ≥ 0; the same (seed, size) gives the same parquet content.
        test_label: also write a constant 0.0 `label` column into test.parquet.
        images: write item_images/<item_id>.jpg (32x32 covers). Skipping saves time for large sizes.
        progress: show a rich progress bar over the stages.

    Returns:
        SynthResult(data_dir=out_dir, hidden_dir=out_dir/"hidden", meta=<the dict written to meta.json>).

    Raises:
        QinError: out_dir is a file, lies under a file, holds real (non-synth) data, or seed < 0.
    """
    try:
        size = SynthSize(size)
    except ValueError:
        raise QinError(f"synth: unknown size {size!r}; choose one of "
                       f"{', '.join(s.value for s in SynthSize)}") from None
    return _synthesize(Path(out_dir), size, seed, test_label, images, progress, DEFAULT_PARAMS)


def _synthesize(out_dir: Path, size: SynthSize, seed: int, test_label: bool, images: bool, progress: bool,
                prm: SynthParams) -> SynthResult:
    """`synthesize` with explicit parameters (used for tuning)."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise QinError(f"synth: seed must be an integer ≥ 0, got {seed!r}")
    _check_out_dir(out_dir)
    spec = SIZES[size]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    columns = (TextColumn("[bold]synth {task.fields[size]}[/] {task.description:<28}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, disable=not progress) as bar:
            meta = _build(tmp, spec, size, seed, test_label, images, prm, bar)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return SynthResult(data_dir=out_dir, hidden_dir=out_dir / HIDDEN_SUBDIR, meta=meta)


def _stages(bar: Progress, size: SynthSize, names: list[str]) -> Iterator[str]:
    """Yield stage names while advancing a stage bar."""
    task = bar.add_task("", total=len(names), size=size.value)
    for name in names:
        bar.update(task, description=name)
        yield name
        bar.advance(task)
    bar.update(task, description="done")


def _build(tmp: Path, spec: SizeSpec, size: SynthSize, seed: int, test_label: bool, images: bool,
           prm: SynthParams, bar: Progress) -> dict:
    """Generate everything into tmp; returns meta.json's dict."""
    names = ["items", "content vectors + PCA", "titles", "cover images", "users + histories",
             "candidates + labels", "train/valid/test", "item_seq", "truth + meta"]
    stage = _stages(bar, size, names)
    (tmp / DATA_SUBDIR).mkdir()
    (tmp / HIDDEN_SUBDIR).mkdir()

    next(stage)
    items = _make_items(spec, prm, seed, size)
    n = spec.n_items
    rng_miss = _rng(seed, size, "missing")
    empty_title = rng_miss.random(n) < prm.p_empty_title  # (N,) for items 1..N
    has_image = np.r_[False, rng_miss.random(n) >= prm.p_missing_image]  # (N+1,)

    next(stage)
    txt, img = _content_vectors(items, prm, empty_title, seed, size)
    emb = _pca((txt, img), EMB_DIM)
    variants = _emb_variants(items, prm, seed, size)

    next(stage)
    titles = _titles(items, spec.n_topics, empty_title, seed, size)
    _write_items(tmp, items, titles, txt, img, emb, variants)
    del txt, img, emb, variants

    next(stage)
    if images:
        task = bar.add_task("images", total=int(has_image.sum()), size=size.value)
        _write_images(items, tmp / IMAGES_SUBDIR, has_image, prm, seed, size,
                      lambda m: bar.advance(task, m))
        bar.remove_task(task)

    next(stage)
    split_users = _split_users(spec)
    users = _make_users(int(split_users[2][-1]) + 1, items, spec, prm, seed, size)

    next(stage)
    rows = _make_rows(spec, users, items, prm, seed, size, split_users)
    beta0 = _bisect_beta0(rows.f_raw, prm.target_rate)
    p_true = _sigmoid(rows.f_raw + beta0)
    y = (_rng(seed, size, "labels").random(p_true.size) < p_true).astype(np.float64)

    next(stage)
    task = bar.add_task("rows", total=int(rows.user.size), size=size.value)
    split_idx = [np.nonzero(rows.split == s)[0] for s in range(3)]
    for s, name in enumerate(("train", "valid", "test")):
        is_test = name == "test"
        labels = (np.zeros(split_idx[s].size) if test_label else None) if is_test else y[split_idx[s]]
        _write_split(tmp / DATA_SUBDIR / f"{name}.parquet", split_idx[s], labels, is_test, rows, users, items,
                     spec, lambda m: bar.advance(task, m))
    bar.remove_task(task)

    next(stage)
    n_seq_rows = _write_item_seq(tmp / "item_seq.parquet", users, prm)

    next(stage)
    tr, va, te = split_idx
    _write_hidden(tmp / HIDDEN_SUBDIR, items, p_true[va], p_true[te], y[te])
    pop = items.log_pop[rows.item]
    meta = {
        "generator": "qin.synth",
        "size": size.value,
        "seed": seed,
        "size_spec": asdict(spec),
        "params": asdict(prm),
        "beta0": beta0,
        "rows": {"train": int(tr.size), "valid": int(va.size), "test": int(te.size), "item_seq": n_seq_rows},
        "users": {"train": int(split_users[0].size), "valid": int(split_users[1].size),
                  "test": int(split_users[2].size)},
        "items": n,
        "max_tag_id": int(items.tags.max()),
        "n_empty_titles": int(empty_title.sum()),
        "n_missing_images": int((~has_image[1:]).sum()),
        "images_written": bool(images),
        "test_label": "const0" if test_label else "absent",
        "label_rate": {"train": float(y[tr].mean()), "valid": float(y[va].mean()),
                       "test": float(y[te].mean())},
        "mean_p_true": {"train": float(p_true[tr].mean()), "valid": float(p_true[va].mean()),
                        "test": float(p_true[te].mean())},
        "history_len": {"mean": float(users.hist_len.mean()), "median": float(np.median(users.hist_len))},
        "auc": {
            "oracle_valid": _auc(y[va], p_true[va]),
            "oracle_test": _auc(y[te], p_true[te]),
            "expected_oracle_valid": expected_auc(p_true[va]),
            "expected_oracle_test": expected_auc(p_true[te]),
            "popularity_valid": _auc(y[va], pop[va]),
            "popularity_test": _auc(y[te], pop[te]),
            "s_tag_valid": _auc(y[va], rows.s_tag[va]),
            "s_tag_test": _auc(y[te], rows.s_tag[te]),
            "s_att_test": _auc(y[te], rows.s_att[te]),
        },
        "notes": "hidden/ holds the truth; the solution must never read it. valid_truth.row = row in "
                 "valid.parquet; test_truth.ID = test.parquet ID. item_seq.parquet lists are unpadded.",
    }
    (tmp / HIDDEN_SUBDIR / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")
    for _ in stage:  # finish the bar
        pass
    return meta
