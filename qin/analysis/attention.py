"""Target attention: one row's weights (`attention_for`) and their statistics over many rows.

Models expose `attention_weights(batch) -> (B, L)` (0 on padding) or None (no attention). QIN's ReLU
weights and DIN's MLP scores are not normalised (DIN's may be negative), so the statistics use each row's
*shares*: |w_j| / sum_j |w_j| over its real history slots (a row whose weights are all 0 has no shares).
Notation: R rows analysed, L history slots (left-padded, most recent last), M item-vector width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import torch

from qin.analysis.load import AnalysisData
from qin.errors import QinError
from qin.predict import one_request

ATTENTION_ROWS = 5000  # rows sampled for `attention_stats` (all rows when the split is smaller)


def attention_for(data: AnalysisData, row: int, targets: Sequence[int] | None = None) -> pl.DataFrame | None:
    """Attention weight of each history item of validation `row`, for its target or chosen targets.

    Returns:
        One row per (target, history item): target_item, target_title, label (the user's validation label
        for that item, null when the user has no such row), prediction (the model's, for this history),
        slot (0 = oldest), item_id, title, weight, shares_tag (the history item has a tag of the target),
        cosine (of the two item vectors). None for a model without attention (e.g. qin_no_asta).
    """
    valid = data.run.features.split("valid")
    if not 0 <= row < len(valid.item_id):
        raise QinError(f"row {row} is not in the validation split (0..{len(valid.item_id) - 1})")
    chosen = [int(valid.item_id[row])] if targets is None else [int(t) for t in targets]
    history = np.asarray(valid.history[row], dtype=np.int64)  # (L,)
    likes = np.full(len(chosen), int(valid.likes_level[row]), dtype=np.int64)  # encoded (level + 1)
    views = np.full(len(chosen), int(valid.views_level[row]), dtype=np.int64)
    weights = _weights(data, np.array(chosen), np.tile(history, (len(chosen), 1)), likes, views)  # (T, L)
    if weights is None:
        return None
    predictions = one_request(data.run, history, np.array(chosen), likes, views)  # (T,)
    keep = np.flatnonzero(history != 0)  # real slots, oldest first
    vectors = np.asarray(data.run.features.item_emb, dtype=np.float64)
    item_tags = zip(data.items["item_id"].to_list(), data.items["tags"].to_list(), strict=True)
    tag_sets = {int(i): set(t) for i, t in item_tags}
    user = data.frame["user_id"][row]
    labels = dict(data.frame.filter(pl.col("user_id") == user).select("item_id", "label").iter_rows())
    records = []
    for t, target in enumerate(chosen):
        for slot, position in enumerate(keep):
            item = int(history[position])
            records.append((target, labels.get(target), float(predictions[t]), slot, item,
                            float(weights[t, position]),
                            bool(tag_sets.get(item, set()) & tag_sets.get(target, set())),
                            _cosine(vectors[target], vectors[item])))
    frame = pl.DataFrame(records, orient="row", schema={
        "target_item": pl.Int64, "label": pl.Float64, "prediction": pl.Float64, "slot": pl.Int64,
        "item_id": pl.Int64, "weight": pl.Float64, "shares_tag": pl.Boolean, "cosine": pl.Float64})
    titles = data.items.select("item_id", "title")
    frame = frame.join(titles, on="item_id", how="left", maintain_order="left").join(
        titles.rename({"item_id": "target_item", "title": "target_title"}), on="target_item", how="left",
        maintain_order="left")
    return frame.select("target_item", "target_title", "label", "prediction", "slot", "item_id", "title",
                        "weight", "shares_tag", "cosine")


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def _weights(data: AnalysisData, targets: np.ndarray, history: np.ndarray, likes: np.ndarray,
             views: np.ndarray, batch_size: int = 4096) -> np.ndarray | None:
    """The model's attention weights (R, L) float64 for these rows (encoded levels), in batches; None
    for a model without attention."""
    import torch

    from qin.batch import Batch

    out = []
    for start in range(0, len(targets), batch_size):
        part = slice(start, start + batch_size)
        batch = Batch(target_item=_long(targets[part]), history=_long(history[part]),
                      likes_level=_long(likes[part]), views_level=_long(views[part])).to(data.run.device)
        with torch.no_grad():
            weights = data.run.model.attention_weights(batch)  # (b, L) or None
        if weights is None:
            return None
        out.append(weights.float().cpu().numpy().astype(np.float64))
    return np.concatenate(out) if out else np.zeros((0, history.shape[1]))


def _long(array: np.ndarray) -> torch.Tensor:
    import torch

    return torch.as_tensor(np.asarray(array, dtype=np.int64))


@dataclass(frozen=True)
class AttentionStats:
    """Attention over many validation rows (see `summarize_attention` for the columns)."""

    per_row: pl.DataFrame  # (R rows)
    by_recency: pl.DataFrame  # one row per position from the most recent history item
    by_cosine: pl.DataFrame  # one row per bin of target-history cosine
    summary: pl.DataFrame  # statistic | value


def attention_shares(weights: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shares (R, L): |w| / sum |w| over real slots, 0 on padding, NaN in rows of zero mass; mass (R,))."""
    magnitude = np.where(mask, np.abs(np.asarray(weights, dtype=np.float64)), 0.0)  # (R, L)
    mass = magnitude.sum(axis=1)  # (R,)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(mass[:, None] > 0, magnitude / mass[:, None], np.nan)
    return shares, mass


def recency_positions(mask: np.ndarray) -> np.ndarray:
    """(R, L) int64: 0 for each row's most recent real slot, 1 for the one before, ...; -1 on padding."""
    later = np.cumsum(mask[:, ::-1], axis=1)[:, ::-1]  # real slots at or after each slot
    return np.where(mask, later - 1, -1).astype(np.int64)


def summarize_attention(weights: np.ndarray, mask: np.ndarray, cosine: np.ndarray,
                        rows: np.ndarray | None = None, cosine_bins: int = 10) -> AttentionStats:
    """Statistics of attention weights (R, L) over the real slots `mask` (R, L), with cos(target, history
    item) `cosine` (R, L).

    per_row: row, history_len, mass (sum |w|), entropy (of the shares, nats), relative_entropy (entropy /
    log history_len: 1 = uniform, 0 = all on one item; NaN below 2 items), top1_share, top3_share,
    cosine_corr (Pearson correlation of share and cosine over the row's slots; NaN below 2 items or when
    either is constant). Undefined values (e.g. every statistic of a row of zero mass) are null.
    by_recency: recency (0 = the most recent item), rows (rows with an item there and some mass),
    mean_weight (raw), mean_share, uniform_share (mean 1 / history_len of those rows: no preference).
    by_cosine: equal-width bins of cosine over [-1, 1]: lower, upper, pairs, mean_share, mean_weight.
    """
    mask = np.asarray(mask, dtype=bool)
    weights, cosine = np.asarray(weights, dtype=np.float64), np.asarray(cosine, dtype=np.float64)
    shares, mass = attention_shares(weights, mask)
    count = mask.sum(axis=1)  # (R,)
    live = mass > 0  # rows with shares
    filled = np.nan_to_num(shares)  # (R, L): 0 on padding and in rows of zero mass
    with np.errstate(invalid="ignore", divide="ignore"):
        entropy = -np.sum(filled * np.log(np.where(filled > 0, filled, 1.0)), axis=1)  # 0 log 0 = 0
        ordered = -np.sort(-filled, axis=1)  # largest share first
        n = np.maximum(count, 1)
        share_mean = filled.sum(axis=1) / n
        cos_mean = np.where(mask, cosine, 0.0).sum(axis=1) / n
        ds = np.where(mask, filled - share_mean[:, None], 0.0)
        dc = np.where(mask, cosine - cos_mean[:, None], 0.0)
        var_s, var_c = (ds * ds).sum(axis=1), (dc * dc).sum(axis=1)
        ok = live & (count >= 2) & (var_s > 1e-24) & (var_c > 1e-24)
        corr = np.where(ok, (ds * dc).sum(axis=1) / np.sqrt(var_s * var_c), np.nan)
        relative = np.where(live & (count >= 2), entropy / np.log(np.maximum(count, 2)), np.nan)
    nan = np.full(len(mass), np.nan)
    per_row = pl.DataFrame({
        "row": np.arange(len(mass)) if rows is None else np.asarray(rows), "history_len": count, "mass": mass,
        "entropy": np.where(live, entropy, nan), "relative_entropy": relative,
        "top1_share": np.where(live, ordered[:, 0] if ordered.shape[1] else nan, nan),
        "top3_share": np.where(live, ordered[:, :3].sum(axis=1), nan), "cosine_corr": corr,
    }, schema_overrides={"row": pl.Int64, "history_len": pl.Int64}).fill_nan(None)
    return AttentionStats(per_row, _by_recency(weights, mask, filled, live, count),
                          _by_cosine(weights, mask & live[:, None], filled, cosine, cosine_bins),
                          _summary(per_row, mask & live[:, None], filled, cosine))


def _by_recency(weights: np.ndarray, mask: np.ndarray, shares: np.ndarray, live: np.ndarray,
                count: np.ndarray) -> pl.DataFrame:
    position = np.where(live[:, None], recency_positions(mask), -1)  # (R, L)
    chosen = position >= 0
    depth = int(position.max()) + 1 if chosen.any() else 0
    index, rows = position[chosen], np.broadcast_to(np.arange(len(count))[:, None], mask.shape)[chosen]
    pairs = np.bincount(index, minlength=depth)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pl.DataFrame({
            "recency": np.arange(depth, dtype=np.int64), "rows": pairs.astype(np.int64),
            "mean_weight": np.bincount(index, weights[chosen], depth) / pairs,
            "mean_share": np.bincount(index, shares[chosen], depth) / pairs,
            "uniform_share": np.bincount(index, 1.0 / np.maximum(count[rows], 1), depth) / pairs})


def _by_cosine(weights: np.ndarray, mask: np.ndarray, shares: np.ndarray, cosine: np.ndarray,
               bins: int) -> pl.DataFrame:
    edges = np.linspace(-1.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, cosine[mask], side="right") - 1, 0, bins - 1)
    pairs = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        table = pl.DataFrame({"lower": edges[:-1], "upper": edges[1:], "pairs": pairs.astype(np.int64),
                              "mean_share": np.bincount(index, shares[mask], bins) / pairs,
                              "mean_weight": np.bincount(index, weights[mask], bins) / pairs})
    return table.filter(pl.col("pairs") > 0)


def _summary(per_row: pl.DataFrame, mask: np.ndarray, shares: np.ndarray, cosine: np.ndarray) -> pl.DataFrame:
    """statistic | value: means over the rows with attention mass (and pooled over their slots)."""
    has_history = per_row.filter(pl.col("history_len") > 0)
    live = has_history.filter(pl.col("mass") > 0)
    lengths = live["history_len"].cast(pl.Float64)
    pooled = np.corrcoef(shares[mask], cosine[mask])[0, 1] if mask.sum() >= 2 else np.nan
    if not np.isfinite(pooled):
        pooled = np.nan
    values = [
        ("rows analysed", per_row.height), ("rows with a history", has_history.height),
        ("rows whose weights are all 0", has_history.height - live.height),
        ("mean history length", lengths.mean()), ("mean attention mass (sum |w|)", live["mass"].mean()),
        ("mean entropy of the shares (nats)", live["entropy"].mean()),
        ("mean relative entropy (1 = uniform)", live["relative_entropy"].mean()),
        ("mean top-1 share", live["top1_share"].mean()), ("top-1 share if uniform", (1.0 / lengths).mean()),
        ("mean top-3 share", live["top3_share"].mean()),
        ("top-3 share if uniform", (lengths.clip(upper_bound=3) / lengths).mean()),
        ("mean within-row corr(share, cosine)", live["cosine_corr"].mean()),
        ("pooled corr(share, cosine)", float(pooled)),
    ]
    return pl.DataFrame({"statistic": [name for name, _ in values],
                         # polars types a Series' mean() as any Python literal: here a float or None
                         "value": [None if v is None else float(cast(float, v)) for _, v in values]},
                        schema={"statistic": pl.String, "value": pl.Float64})


def attention_stats(data: AnalysisData, rows: int = ATTENTION_ROWS, seed: int = 0) -> AttentionStats | None:
    """`summarize_attention` over `rows` validation rows drawn at random (all when fewer), each scored for
    its own target; None for a model without attention."""
    valid = data.run.features.split("valid")
    total = len(valid.item_id)
    chosen = np.arange(total) if total <= rows else np.sort(
        np.random.default_rng(seed).choice(total, rows, replace=False))
    targets = np.asarray(valid.item_id[chosen], dtype=np.int64)  # (R,)
    history = np.asarray(valid.history[chosen], dtype=np.int64)  # (R, L)
    weights = _weights(data, targets, history, np.asarray(valid.likes_level[chosen]),
                       np.asarray(valid.views_level[chosen]))
    if weights is None:
        return None
    table = np.asarray(data.run.features.item_emb, dtype=np.float32)  # (V, M)
    unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)
    cosine = np.zeros(history.shape)
    for start in range(0, len(targets), 4096):
        part = slice(start, start + 4096)
        cosine[part] = np.einsum("rm,rlm->rl", unit[targets[part]], unit[history[part]])
    return summarize_attention(weights, history != 0, cosine, rows=chosen)
