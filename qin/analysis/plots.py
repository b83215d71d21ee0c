"""Error-analysis figures: matplotlib.figure.Figure, not pyplot (nothing global, nothing shown).

A notebook shows what a cell returns; a script can `savefig`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from qin.analysis.attention import AttentionStats

FIG_DPI = 100


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=FIG_DPI, layout="constrained")


def plot_slice_auc(slices: Mapping[str, pl.DataFrame], overall_auc: float | None = None,
                   columns: int = 3) -> Figure:
    """One bar panel per slicing: AUC per slice (oracle as black ticks, baselines as markers when the tables
    have them), rows under each label."""
    rows = math.ceil(len(slices) / columns)
    fig = _figure(4.6 * columns, 3.4 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (title, table) in zip(axes, slices.items(), strict=False):
        x = np.arange(table.height)
        model = table["auc"].to_numpy()
        ax.bar(x, np.nan_to_num(model, nan=0.0), color="tab:blue", alpha=0.8, label="model")
        lows = [np.nanmin(model)] if np.isfinite(model).any() else [0.5]
        for column, marker, color, name in (("oracle_auc", "_", "black", "oracle"),
                                            ("popularity_auc", "x", "tab:grey", "popularity baseline"),
                                            ("lr_2_auc", ".", "tab:green", "lr_2 baseline")):
            if column in table.columns:
                values = table[column].to_numpy()
                ax.scatter(x, values, marker=marker, s=300 if marker == "_" else 40, color=color, zorder=3,
                           label=name)
                lows.append(np.nanmin(values) if np.isfinite(values).any() else 0.5)
        if overall_auc is not None:
            ax.axhline(overall_auc, color="tab:red", linestyle="--", linewidth=1, label="all rows")
        ax.set_ylim(max(0.0, min(lows) - 0.05), 1.0)
        _label_slice_axis(ax, table, title, "AUC")
    _finish_slice_grid(fig, axes, len(slices), "lower left", "AUC by slice (label, then rows)")
    return fig


def _label_slice_axis(ax: Any, table: pl.DataFrame, title: str, ylabel: str) -> None:
    """One slice panel's x tick labels ("slice\nrows"), title and y label."""
    x = np.arange(table.height)
    ax.set_xticks(x, [f"{s}\n{n}" for s, n in zip(table["slice"], table["rows"], strict=True)],
                  fontsize=7, rotation=0 if table.height <= 8 else 45)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def _finish_slice_grid(fig: Figure, axes: Any, used: int, legend_loc: str, title: str) -> None:
    """Hide the grid's unused panels, put the legend on the first and the title on the figure."""
    for ax in axes[used:]:
        ax.set_visible(False)
    if used:
        axes[0].legend(fontsize=7, loc=legend_loc)
    fig.suptitle(title, fontsize=11)


def plot_calibration(table: pl.DataFrame, title: str = "Reliability diagram") -> Figure:
    """Label rate against mean prediction per bin (marker area ~ rows), and the rows per bin."""
    fig = _figure(5.5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    predicted, observed, rows = (table[c].to_numpy() for c in ("mean_prediction", "label_rate", "rows"))
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    top.plot(predicted, observed, marker="o", color="tab:blue", label="model: observed click rate")
    top.scatter(predicted, observed, s=20 + 300 * rows / max(rows.max(), 1), color="tab:blue", alpha=0.3)
    if "mean_p_true" in table.columns:
        top.plot(predicted, table["mean_p_true"].to_numpy(), marker="x", color="black", linestyle="--",
                 label="true click probability (oracle)")
    top.set_ylabel("click rate")
    top.set_ylim(0, 1)
    top.legend(fontsize=8, loc="upper left")
    top.set_title(title, fontsize=11)
    widths = (table["upper"] - table["lower"]).to_numpy()
    bottom.bar(table["lower"].to_numpy(), rows, width=widths, align="edge", color="tab:grey",
               edgecolor="white")
    bottom.set_ylabel("rows")
    bottom.set_xlabel("predicted click probability")
    bottom.set_xlim(0, 1)
    return fig


def plot_score_histograms(frame: pl.DataFrame, bins: int = 40) -> Figure:
    """Prediction histograms of clicked and non-clicked rows (and of p_true, when known)."""
    columns = [("prediction", "model prediction")] + ([("p_true", "true probability (oracle)")]
                                                       if "p_true" in frame.columns else [])
    fig = _figure(5.0 * len(columns), 3.4)
    axes = np.atleast_1d(fig.subplots(1, len(columns), squeeze=False)).ravel()
    edges = np.linspace(0, 1, bins + 1)
    labels = frame["label"].to_numpy()
    for ax, (column, title) in zip(axes, columns, strict=True):
        scores = frame[column].to_numpy()
        for value, name, color in ((0, "not clicked", "tab:blue"), (1, "clicked", "tab:orange")):
            chosen = scores[labels == value]
            ax.hist(chosen, bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{name} ({chosen.size} rows)")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("probability")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    return fig


def _short(text: str | None, fallback: str, width: int = 28) -> str:
    text = fallback if text is None or text == "" else text
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_attention(attention: pl.DataFrame | None) -> Figure:
    """Attention weight of each history item (rows, most recent at the bottom), one panel per target.

    Orange bars: the history item shares a tag with the target; red: it is the target itself.
    """
    if attention is None or attention.height == 0:
        fig = _figure(5, 1.5)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "this model has no target attention", ha="center", va="center")
        ax.set_axis_off()
        return fig
    targets = attention["target_item"].unique(maintain_order=True).to_list()
    first = attention.filter(pl.col("target_item") == targets[0]).sort("slot")
    slots = first.height
    fig = _figure(2.2 + 2.6 * len(targets), 1.2 + 0.22 * slots)
    axes = np.atleast_1d(fig.subplots(1, len(targets), sharex=True, sharey=True, squeeze=False)).ravel()
    names = [f"{_short(t, str(i))} · {i}" for t, i in zip(first["title"], first["item_id"], strict=True)]
    for ax, target in zip(axes, targets, strict=True):
        part = attention.filter(pl.col("target_item") == target).sort("slot")
        colors = np.where(part["shares_tag"].to_numpy(), "tab:orange", "tab:blue")
        colors[part["item_id"].to_numpy() == target] = "tab:red"
        ax.barh(part["slot"].to_numpy(), part["weight"].to_numpy(), color=colors)
        label = part["label"][0]
        outcome = "" if label is None else (" clicked" if label == 1 else " not clicked")
        ax.set_title(f"target: {_short(part['target_title'][0], str(target), 22)}\n"
                     f"p={part['prediction'][0]:.3f}{outcome}", fontsize=8)
        ax.set_xlabel("attention weight", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
    axes[0].set_yticks(np.arange(slots), names, fontsize=7)
    axes[0].invert_yaxis()  # oldest at the top, most recent at the bottom
    axes[0].set_ylabel("history (oldest at the top)", fontsize=8)
    fig.suptitle("ASTA attention over one user's history (orange: shares a tag with the target; red: is the "
                 "target)", fontsize=10)
    return fig


def plot_learning_curves(curves: pl.DataFrame) -> Figure:
    """Train loss and valid logloss, valid AUC (best marked), and learning rate, against the step."""
    fig = _figure(13, 3.4)
    loss_ax, auc_ax, lr_ax = fig.subplots(1, 3)
    steps = curves["step"].to_numpy()
    if "train_loss" in curves.columns:
        loss_ax.plot(steps, curves["train_loss"].to_numpy(), marker="o", label="train loss")
    if "valid_logloss" in curves.columns:
        loss_ax.plot(steps, curves["valid_logloss"].to_numpy(), marker="o", label="valid logloss")
    loss_ax.set_title("loss", fontsize=11)
    loss_ax.legend(fontsize=8)
    values = curves["valid_auc"].to_numpy()
    auc_ax.plot(steps, values, marker="o", color="tab:green")
    if np.isfinite(values).any():
        best = int(np.nanargmax(values))
        auc_ax.scatter([steps[best]], [values[best]], s=120, facecolors="none", edgecolors="tab:red",
                       label=f"best {values[best]:.4f} (step {steps[best]})", zorder=3)
        auc_ax.legend(fontsize=8)
    auc_ax.set_title("valid AUC", fontsize=11)
    if "lr" in curves.columns:
        lr_ax.plot(steps, curves["lr"].to_numpy(), marker="o", color="tab:purple")
        lr_ax.set_yscale("log")
    lr_ax.set_title("learning rate", fontsize=11)
    for ax in (loss_ax, auc_ax, lr_ax):
        ax.set_xlabel("step")
    return fig


def plot_slice_calibration(slices: Mapping[str, pl.DataFrame], columns: int = 3) -> Figure:
    """One panel per slicing: calibration ratio (sum p / sum y) per slice as a bar from 1 (calibrated,
    dotted): up (red) over-predicts, down (blue) under-predicts. Oracle and lr_2 ratios as markers when the
    tables have them; a slice without clicks has no bar."""
    rows = math.ceil(len(slices) / columns)
    fig = _figure(4.6 * columns, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax, (title, table) in zip(axes, slices.items(), strict=False):
        x = np.arange(table.height)
        ratio = table["calibration_ratio"].to_numpy()
        ax.bar(x, np.nan_to_num(ratio - 1.0, nan=0.0), bottom=1.0,
               color=np.where(ratio > 1, "tab:red", "tab:blue"), alpha=0.7, label="model")
        for column, marker, color, name in (("oracle_calibration_ratio", "_", "black", "oracle"),
                                            ("lr_2_calibration_ratio", ".", "tab:green", "lr_2 baseline")):
            if column in table.columns:
                ax.scatter(x, table[column].to_numpy(), marker=marker, s=300 if marker == "_" else 40,
                           color=color, zorder=3, label=name)
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        _label_slice_axis(ax, table, title, "predicted / observed clicks")
    _finish_slice_grid(fig, axes, len(slices), "best",
                       "Calibration ratio by slice (label, then rows; red: over-predicts)")
    return fig


def plot_attention_stats(stats: AttentionStats | None, max_recency: int = 20) -> Figure:
    """Attention over many rows (`attention_stats`): mean share per position from the most recent item
    (against a uniform weighting), the distribution of relative entropy and top-1 share, and the mean share
    per target-history cosine bin."""
    if stats is None:
        fig = _figure(5, 1.5)
        ax = fig.subplots()
        ax.text(0.5, 0.5, "this model has no target attention", ha="center", va="center")
        ax.set_axis_off()
        return fig
    fig = _figure(15, 3.6)
    recency_ax, spread_ax, cosine_ax = fig.subplots(1, 3)
    recency = stats.by_recency.head(max_recency)
    position = recency["recency"].to_numpy()
    recency_ax.bar(position, recency["mean_share"].to_numpy(), color="tab:blue", alpha=0.8,
                   label="mean share")
    recency_ax.plot(position, recency["uniform_share"].to_numpy(), color="black", marker=".",
                    label="uniform weighting")
    recency_ax.set_xlabel("position from the most recent history item (0 = latest)")
    recency_ax.set_ylabel("share of the row's attention")
    recency_ax.set_title("attention by recency", fontsize=11)
    recency_ax.legend(fontsize=8)
    edges = np.linspace(0, 1, 21)
    for column, color, name in (("relative_entropy", "tab:purple", "entropy / log(history length)"),
                                ("top1_share", "tab:orange", "top-1 share")):
        values = stats.per_row[column].drop_nulls().to_numpy()
        spread_ax.hist(values, bins=edges, alpha=0.55, color=color, label=f"{name} ({values.size} rows)")
    spread_ax.set_xlabel("per row: relative entropy (1 = uniform); top-1 share (1 = all on one item)",
                         fontsize=8)
    spread_ax.set_ylabel("rows")
    spread_ax.set_title("how concentrated is attention?", fontsize=11)
    spread_ax.legend(fontsize=8)
    centres = ((stats.by_cosine["lower"] + stats.by_cosine["upper"]) / 2).to_numpy()
    pairs = stats.by_cosine["pairs"].to_numpy()
    cosine_ax.plot(centres, stats.by_cosine["mean_share"].to_numpy(), color="tab:green", alpha=0.5)
    cosine_ax.scatter(centres, stats.by_cosine["mean_share"].to_numpy(), color="tab:green", zorder=3,
                      s=15 + 200 * pairs / max(pairs.max(), 1) if pairs.size else 15)
    cosine_ax.set_xlabel("cosine(target, history item)")
    cosine_ax.set_ylabel("mean share")
    cosine_ax.set_title("attention vs content similarity (marker area ~ pairs)", fontsize=11)
    rows = int(stats.per_row.height)
    fig.suptitle(f"Target attention over {rows} validation rows", fontsize=11)
    return fig


def plot_comparison(frame: pl.DataFrame, slices: pl.DataFrame, names: tuple[str, str] = ("A", "B"),
                    sample: int = 5000, seed: int = 0) -> Figure:
    """Two runs on the same rows (`compare.py`): p_A against p_B per row (a sample, by label), and
    AUC_A - AUC_B per slice (`compare_slices`; green where A ranks better)."""
    fig = _figure(14, 0.8 + 0.2 * max(slices.height, 20))
    scatter_ax, slice_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 3]})
    shown = frame.sample(min(sample, frame.height), seed=seed) if frame.height else frame
    for value, name, color in ((0, "not clicked", "tab:blue"), (1, "clicked", "tab:orange")):
        part = shown.filter(pl.col("label") == value)
        scatter_ax.scatter(part["prediction"].to_numpy(), part["prediction_b"].to_numpy(), s=6, alpha=0.4,
                           color=color, label=f"{name} ({part.height})")
    scatter_ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    scatter_ax.set_xlabel(f"A: {names[0]}")
    scatter_ax.set_ylabel(f"B: {names[1]}")
    scatter_ax.set_title("predicted click probability per row", fontsize=11)
    scatter_ax.legend(fontsize=8)
    difference = np.nan_to_num(slices["auc_a_minus_b"].to_numpy(), nan=0.0)
    y = np.arange(slices.height)
    slice_ax.barh(y, difference, color=np.where(difference >= 0, "tab:green", "tab:red"))
    slice_ax.set_yticks(y, [f"{g}: {s} ({n})" for g, s, n in
                            zip(slices["slicing"], slices["slice"], slices["rows"], strict=True)], fontsize=7)
    slice_ax.invert_yaxis()
    slice_ax.axvline(0, color="black", linewidth=0.8)
    slice_ax.set_xlabel("AUC A - AUC B (0 where a slice has one class)")
    slice_ax.set_title("where does A rank better? (slice, rows)", fontsize=11)
    return fig
