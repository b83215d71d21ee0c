"""Two runs side by side on the same validation rows: where does run A beat run B, and why?

A comparison frame is run A's analysis frame (`load.py`) with `prediction_b`, run B's prediction on the
same row. Both runs must have scored the same validation rows (same users, items and labels in the same
order): runs trained on one feature folder, or on folders built from the same raw split. Every function
below takes that frame; `load_comparison` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from qin.analysis.load import AnalysisData
from qin.analysis.slices import mean_of, slice_parts, standard_slices
from qin.analysis.tables import overall_metrics
from qin.errors import QinError
from qin.metrics import auc, logloss
from qin.predict import load_run, validation_predictions

SAME_ROWS = ("user_id", "item_id", "label")  # the columns both runs' validation rows must agree on


@dataclass(frozen=True)
class Comparison:
    name_a: str  # run A (the analysed run): its folder name
    name_b: str  # run B (the compare run)
    frame: pl.DataFrame  # run A's analysis frame + prediction_b
    warnings: tuple[str, ...] = ()  # differences that do not stop the comparison (e.g. other feature folders)


def compare_frames(a: pl.DataFrame, b: pl.DataFrame, source_a: str = "run A",
                   source_b: str = "run B") -> pl.DataFrame:
    """`a` with `prediction_b` = b's prediction per row; QinError unless both hold the same rows.

    Args:
        a: run A's per-row validation frame (prediction, and the SAME_ROWS columns).
        b: run B's (`qin.predict.validation_predictions`), in row order.
        source_a, source_b: how to name each side in the error (e.g. its feature folder).
    """
    if a.height != b.height:
        raise QinError(f"the runs scored different validation rows: {a.height} rows ({source_a}) vs "
                       f"{b.height} ({source_b}); compare runs trained on the same feature folder")
    for column in SAME_ROWS:
        differ = np.flatnonzero(a[column].to_numpy() != b[column].to_numpy())
        if differ.size:
            raise QinError(f"the runs scored different validation rows: {column} differs on {differ.size} of "
                           f"{a.height} rows (first: row {differ[0]}) between {source_a} and {source_b}; "
                           "compare runs trained on the same feature folder")
    return a.with_columns(prediction_b=b["prediction"].cast(pl.Float64))


def load_comparison(data: AnalysisData, compare_run: Path | str, feature_dir: Path | str | None = None,
                    device: str = "cpu") -> Comparison:
    """Score run B's validation split and put it beside run A's (`data`).

    Run B is scored on its own feature folder (the one it trained on), or on `feature_dir` when given
    (pass the one run A was analysed with); its rows must be run A's (`compare_frames`).
    """
    if not compare_run:
        raise QinError("no run to compare with: set COMPARE_RUN in the notebook's first cell (or "
                       "QIN_COMPARE_RUN_DIR), or run `qin report --compare RUN`")
    other = load_run(Path(compare_run), feature_dir=Path(feature_dir) if feature_dir else None, device=device)
    dir_a, dir_b = data.run.features.dir, other.features.dir
    frame = compare_frames(data.frame, validation_predictions(other), f"run A, features {dir_a}",
                           f"run B, features {dir_b}")
    warnings = tuple(f"run B: {w}" for w in other.warnings)
    if Path(dir_a).resolve() != Path(dir_b).resolve():
        warnings += (f"the runs used different feature folders ({dir_a}, {dir_b}) holding the same rows",)
    name_a, name_b = data.run.run_dir.name, other.run_dir.name
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    return Comparison(name_a, name_b, frame, warnings)


def compare_overall(frame: pl.DataFrame) -> pl.DataFrame:
    """metric | A | B | A - B: `overall_metrics` of both runs' predictions on the same rows."""
    keep = [c for c in ("label", "user_id") if c in frame.columns]
    a = overall_metrics(frame.select(*keep, "prediction"))
    b = overall_metrics(frame.select(*keep, pl.col("prediction_b").alias("prediction")))
    return pl.DataFrame({"metric": a["metric"], "A": a["model"], "B": b["model"]}).with_columns(
        (pl.col("A") - pl.col("B")).alias("A - B"))


def slice_comparison(frame: pl.DataFrame, by: str, buckets: Sequence[float] | None = None,
                     top: int | None = None) -> pl.DataFrame:
    """Per slice of `by` (as `slice_auc`): slice, rows, positives, auc_a, auc_b, auc_a_minus_b, logloss_a,
    logloss_b (AUC NaN with one class)."""
    records = []
    for _, name, part in slice_parts(frame, by, buckets, top):
        labels = part["label"].to_numpy()
        a, b = part["prediction"].to_numpy(), part["prediction_b"].to_numpy()
        records.append({"slice": name, "rows": part.height, "positives": int(labels.sum()),
                        "auc_a": auc(labels, a), "auc_b": auc(labels, b), "logloss_a": logloss(labels, a),
                        "logloss_b": logloss(labels, b)})
    schema = {"slice": pl.String, "rows": pl.Int64, "positives": pl.Int64, "auc_a": pl.Float64,
              "auc_b": pl.Float64, "logloss_a": pl.Float64, "logloss_b": pl.Float64}
    table = pl.DataFrame(records, schema=schema)
    return table.with_columns((pl.col("auc_a") - pl.col("auc_b")).alias("auc_a_minus_b")).select(
        "slice", "rows", "positives", "auc_a", "auc_b", "auc_a_minus_b", "logloss_a", "logloss_b")


def compare_slices(frame: pl.DataFrame, top_tags: int = 12) -> pl.DataFrame:
    """`slice_comparison` over every standard slicing in one frame, with a leading `slicing` column."""
    tables = standard_slices(frame, top_tags, table=slice_comparison)
    return pl.concat([t.select(pl.lit(name).alias("slicing"), pl.all()) for name, t in tables.items()])


def _closer() -> pl.Expr:
    """"A" when A's prediction is nearer the label than B's, "B" when B's is, "tie" when equally near."""
    a = (pl.col("prediction") - pl.col("label")).abs()
    b = (pl.col("prediction_b") - pl.col("label")).abs()
    return pl.when(a < b).then(pl.lit("A")).when(b < a).then(pl.lit("B")).otherwise(pl.lit("tie"))


def disagreements(frame: pl.DataFrame, n: int = 20) -> pl.DataFrame:
    """The n rows where the runs disagree most (|p_A - p_B| largest first; ties by row), with the label and
    which run was closer to it: row, label, prediction_a, prediction_b, gap (p_A - p_B), closer, and the
    row's facts that the frame has (user, item, title, history length, train count, cold, repeat, p_true)."""
    facts = [c for c in ("user_id", "item_id", "title", "history_len", "train_count", "cold", "repeat",
                         "p_true") if c in frame.columns]
    gap = pl.col("prediction") - pl.col("prediction_b")
    return (frame.with_columns(gap=gap, _size=gap.abs(), closer=_closer())
            .sort(["_size", "row"], descending=[True, False]).head(n)
            .select("row", "label", pl.col("prediction").alias("prediction_a"), "prediction_b", "gap",
                    "closer", *facts))


def disagreement_summary(frame: pl.DataFrame, share: float = 0.05) -> pl.DataFrame:
    """Who wins where the runs disagree most: the `share` of rows with the largest |p_A - p_B| (at least
    one), grouped by label and by which run predicted higher.

    Returns:
        label, higher ("A" or "B"; equal predictions are left out), rows, share_of_rows (of those
        disagreement rows), mean_prediction_a, mean_prediction_b, closer (the run nearer the label in
        this group: the higher one on clicks, the lower on non-clicks), logloss_a, logloss_b.
    """
    if not 0 < share <= 1:
        raise QinError(f"share must be in (0, 1], got {share}")
    top = max(1, int(round(share * frame.height)))
    gap = pl.col("prediction") - pl.col("prediction_b")
    chosen = (frame.with_columns(_size=gap.abs()).sort(["_size", "row"], descending=[True, False]).head(top)
              .filter(gap != 0)
              .with_columns(higher=pl.when(gap > 0).then(pl.lit("A")).otherwise(pl.lit("B"))))
    records = []
    for (label, higher), part in chosen.partition_by(["label", "higher"], as_dict=True).items():
        labels = part["label"].to_numpy()
        records.append({"label": label, "higher": higher, "rows": part.height,
                        "share_of_rows": part.height / top,
                        "mean_prediction_a": mean_of(part["prediction"]),
                        "mean_prediction_b": mean_of(part["prediction_b"]),
                        "closer": higher if label == 1 else ("B" if higher == "A" else "A"),
                        "logloss_a": logloss(labels, part["prediction"].to_numpy()),
                        "logloss_b": logloss(labels, part["prediction_b"].to_numpy())})
    schema = {"label": pl.Float64, "higher": pl.String, "rows": pl.Int64, "share_of_rows": pl.Float64,
              "mean_prediction_a": pl.Float64, "mean_prediction_b": pl.Float64, "closer": pl.String,
              "logloss_a": pl.Float64, "logloss_b": pl.Float64}
    return pl.DataFrame(records, schema=schema).sort(["label", "higher"], descending=[True, False])
