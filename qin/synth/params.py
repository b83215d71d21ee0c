"""Sizes, generator parameters, file-layout constants and the per-purpose random streams."""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qin.errors import QinError
from qin.layout import DATA_SUBDIR as DATA_SUBDIR  # re-exported: qin.synth's names predate qin.layout
from qin.layout import HIDDEN_SUBDIR as HIDDEN_SUBDIR

IMAGES_SUBDIR = "item_images"
TXT_DIM = 768  # BERT-base width, as in txt_emb_BERT
IMG_DIM = 1024  # CLIP RN50 width, as in img_emb_CLIPRN50
EMB_DIM = 128  # item_emb_d128
N_ITEM_TAGS = 5  # item_info.item_tags is zero-padded to 5
CANDIDATES_PER_USER = 4  # ~3.6-4 rows per user in the real train split (docs/data.md §1.1)
EMB_VARIANTS = ("item_emb_d128_v1", "item_emb_d128_v2", "item_emb_d128_v3", "item_emb_d128_e4")


class SynthSize(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form is the agreed public API
    """Named data-set sizes (docs/demo_data.md §5-6)."""

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
    # --- candidates and label function f (docs/demo_data.md §3)
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
    """`base` with NAME=VALUE overrides of its int, float and str fields (for exploring the generator).

    Raises:
        QinError: an assignment without '=', an unknown or non-scalar field, or a value of the wrong type.
    """
    params = base
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        default = getattr(base, name, None)
        if not sep or not isinstance(default, int | float | str):
            raise QinError(f"generator parameter {assignment!r}: expected NAME=VALUE with NAME an int, float "
                           "or str field of SynthParams")
        try:
            change: dict[str, Any] = {name: type(default)(value)}  # checked: a scalar field of SynthParams
            params = replace(params, **change)
        except ValueError:
            raise QinError(f"generator parameter {assignment!r}: {value!r} is not a "
                           f"{type(default).__name__}") from None
    return params


# ---------------------------------------------------------------------------------------------------------
# Randomness: one PCG64 stream per purpose, keyed by (seed, size, purpose) so that adding a stream or
# reordering stages never shifts the numbers of another.


def stream(seed: int, size: SynthSize, purpose: str) -> np.random.Generator:
    """An independent generator for one purpose (e.g. "items.topic")."""
    key = [seed, _SIZE_CODE[size], zlib.crc32(purpose.encode())]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
