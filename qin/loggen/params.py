"""Sizes, every knob of the log-like generator with its tuned default, and the per-purpose random streams."""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, fields, replace

import numpy as np

from qin.errors import QinError


class LogSize(str, enum.Enum):  # noqa: UP042 - the (str, Enum) form matches SynthSize
    """Named data-set sizes of the log-like generator (no `full`: it is a tuning generator)."""

    tiny = "tiny"
    small = "small"
    bench = "bench"


@dataclass(frozen=True)
class LogSizeSpec:
    """The dimensions of one size. Users per split = ceil(rows / LogParams.rows_per_user)."""

    n_items: int
    n_tags: int
    n_genres: int
    train_rows: int
    valid_rows: int
    test_rows: int
    seq_len: int  # S: stored (left-padded) length of item_seq
    chunk_rows: int  # rows per parquet row group (fixed, so the files are deterministic)


LOG_SIZES: dict[LogSize, LogSizeSpec] = {
    LogSize.tiny: LogSizeSpec(1_000, 200, 12, 8_000, 1_000, 1_000, 20, 50_000),
    LogSize.small: LogSizeSpec(3_000, 600, 24, 60_000, 5_000, 5_000, 50, 50_000),
    LogSize.bench: LogSizeSpec(30_000, 3_000, 48, 500_000, 10_000, 50_000, 100, 100_000),
}
_SIZE_CODE = {LogSize.tiny: 10, LogSize.small: 11, LogSize.bench: 12}  # distinct from qin.synth's codes


@dataclass(frozen=True)
class LogParams:
    """Every generator parameter (recorded whole in meta.json). Defaults are the tuned values."""

    # --- items: taste latent, popularity, hidden series, quality
    d_taste: int = 16  # dimension of the taste latent v_i (unit vectors)
    genre_zipf: float = 0.8  # genre sizes ∝ rank^-genre_zipf
    item_spread: float = 1.0  # v_i = normalise(c_genre + item_spread * N(0, I/d)): how far items stray
    pop_zipf: float = 1.1  # intrinsic popularity ∝ rank^-pop_zipf (long tail)
    cold_share: float = 0.08  # items released after the train period: never in train, only valid/test
    series_mean_size: float = 6.0  # items per hidden series (same show / creator), on average
    series_zipf: float = 0.7  # series sizes ∝ rank^-series_zipf: a few long series, many short ones
    quality_pop_corr: float = 0.3  # corr(quality, log popularity): good items spread a little more
    item_bias_sd: float = 0.8  # per-item logit offset no feature explains: only an id embedding learns it
    # --- item side information
    level_noise: float = 0.6  # views_level = decile(z(log pop) + N(0, level_noise²))
    likes_quality: float = 1.0  # likes_level = decile(z(log pop) + likes_quality * quality + noise)
    tag_extra_p: float = 0.4  # tags per item = 1 + Binomial(4, tag_extra_p)
    tag_from_genre: float = 0.45  # share of tags drawn from the genre's pool; the rest are global noise
    tag_zipf: float = 1.0  # within a pool and globally, tag popularity ∝ rank^-tag_zipf
    # --- item_emb_d128: a weak, noisy view of the taste latent, rotated and scaled like PCA output
    content_taste_noise: float = 0.45  # per-dim noise added to v_i (per-dim sd of v_i is ~1/sqrt(d))
    content_nuisance_dim: int = 16  # style directions unrelated to taste (lighting, language, length)
    content_nuisance_sd: float = 0.6  # sd of each nuisance factor (v_i's total variance is 1)
    content_noise_sd: float = 0.15  # per-dim noise over all 128 dims, with a decaying spectrum
    content_top_std: float = 3.0  # std of the first principal component after scaling
    # --- users: drifting interest and short histories
    user_spread: float = 1.0  # initial interest = normalise(c_genre + user_spread * N(0, I/d))
    interest_drift: float = 0.5  # per-step random-walk step of the interest (÷ sqrt(d)), renormalised
    hist_mean: float = 5.5  # L = 1 + NegBin(mean hist_mean - 1, hist_dispersion), clipped to S
    hist_dispersion: float = 0.8  # NegBin shape r: small r = many 1-2 item users and a long tail
    hist_beta: float = 10.0  # a free history item is drawn ∝ pop^hist_pop_power exp(hist_beta <u_k, v_i>)
    hist_pop_power: float = 0.8
    sir_proposals: int = 64  # popularity proposals per draw, resampled by interest (sampling-importance)
    p_series: float = 0.3  # a history item continues the series of the previous one (binge watching)
    # --- candidates (rows_per_user per user, all at the user's current time step)
    rows_per_user: int = 4
    p_cand_interest: float = 0.3  # drawn like a history item but with the CURRENT interest
    p_cand_series: float = 0.12  # another item of the series of a random history item
    p_cand_cold: float = 0.06  # valid/test only: a new (cold) item
    cand_pop_power: float = 0.7  # the remaining candidates are drawn ∝ pop^cand_pop_power
    # --- click logit f and labels
    w_match: float = 5.0  # <u_now, v_t>: current interest vs the target's taste
    w_series: float = 2.0  # log(1 + history items in the target's series)
    w_quality: float = 0.4
    w_pop: float = 0.7  # log popularity z-scored over shown items: popularity alone AUC ≈ 0.57-0.63
    user_bias_sd: float = 0.5
    label_eps: float = 0.06  # p_true = eps/2 + (1 - eps) sigmoid(f): label noise caps the oracle
    target_rate: float = 0.25  # the intercept is bisected so that mean p_true over all rows equals this

    def __post_init__(self) -> None:
        shares = (self.cold_share, self.quality_pop_corr, self.tag_extra_p, self.tag_from_genre,
                  self.p_series, self.p_cand_interest, self.p_cand_series, self.p_cand_cold, self.label_eps)
        if not all(0.0 <= s <= 1.0 for s in shares) or not 0.0 < self.target_rate < 1.0:
            raise QinError("LogParams: shares and probabilities must lie in [0, 1] (target_rate in (0, 1))")
        if self.p_cand_interest + self.p_cand_series + self.p_cand_cold > 1.0:
            raise QinError("LogParams: p_cand_interest + p_cand_series + p_cand_cold must be ≤ 1")
        if min(self.d_taste, self.sir_proposals, self.rows_per_user, self.content_nuisance_dim + 1) < 1:
            raise QinError("LogParams: d_taste, sir_proposals and rows_per_user must be ≥ 1")


DEFAULT_LOG_PARAMS = LogParams()


def log_params_with(assignments: list[str], base: LogParams = DEFAULT_LOG_PARAMS) -> LogParams:
    """`base` with NAME=VALUE overrides of its int and float fields (for tuning the generator).

    Raises:
        QinError: an assignment without '=', an unknown field (named), or a value that does not parse.
    """
    kinds = {f.name: type(getattr(base, f.name)) for f in fields(base)}
    params = base
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        name = name.strip()
        if not sep:
            raise QinError(f"loggen parameter {assignment!r}: expected NAME=VALUE")
        if name not in kinds:
            raise QinError(f"loggen parameter {name!r} is unknown; known: {', '.join(kinds)}")
        try:
            params = replace(params, **{name: kinds[name](value.strip())})
        except ValueError:
            raise QinError(f"loggen parameter {name!r}: {value!r} is not a {kinds[name].__name__}") from None
    return params


def stream(seed: int, size: LogSize, purpose: str) -> np.random.Generator:
    """An independent PCG64 generator per (seed, size, purpose): new stages never shift the others."""
    key = [seed, _SIZE_CODE[size], zlib.crc32(purpose.encode())]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
