"""Loading a run for error analysis: its validation rows scored and joined with item facts.

Columns of `AnalysisData.frame` (N validation rows): row, user_id, item_id, likes_level, views_level (raw
0..9), history_len, label, prediction, title, tags (list), train_count (rows with this item as target in
train), train_ctr (its click rate there, null when unseen), cold (train_count <= cold_max), and p_true (the
generator's true click probability) on generated data when a truth folder is found; repeat (the target is
already in the row's history).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from qin.errors import QinError
from qin.evaluation import check_truth_matches, read_truth
from qin.predict import LoadedRun, load_run, validation_predictions

DEFAULT_COLD_MAX = 5  # an item seen as a target at most this often in train counts as cold


@dataclass(frozen=True)
class AnalysisData:
    """A run's validation rows with everything the analysis joins onto them."""

    run: LoadedRun
    frame: pl.DataFrame  # (N rows) see the module docstring
    items: pl.DataFrame  # (V rows) item_id, title, tags, train_count, train_ctr
    raw_dir: Path
    item_feature: Path | None  # titles come from here; None = no titles
    truth_dir: Path | None  # generator truth (p_true); None on real data
    cold_max: int

    @property
    def has_oracle(self) -> bool:
        return "p_true" in self.frame.columns


def load_analysis(run_dir: Path | str, truth_dir: Path | str | None = None, raw_dir: Path | str | None = None,
                  item_feature: Path | str | None = None, feature_dir: Path | str | None = None,
                  device: str = "cpu", cold_max: int = DEFAULT_COLD_MAX) -> AnalysisData:
    """Score the validation split with the run's best model and join item facts onto each row.

    Args:
        run_dir: a run folder (best.pt, config.yaml, metrics.jsonl).
        truth_dir: generator truth folder with valid_truth.parquet; None = `<raw_dir parent>/hidden`
            when it exists (generated data), else no oracle.
        raw_dir: the raw challenge folder; None = the run's `data.raw_dir`.
        item_feature: item_feature.parquet (titles, tags); None = `<raw_dir parent>/item_feature.parquet`
            when it exists.
        feature_dir: feature folder; None = the one the run was trained on.
        device: where to score ("cpu" keeps the analysis off a GPU that may be training).
        cold_max: items with at most this many train rows are flagged cold.
    """
    run = load_run(Path(run_dir), feature_dir=Path(feature_dir) if feature_dir else None, device=device)
    raw = Path(raw_dir) if raw_dir is not None else Path(run.config.data.raw_dir)
    if item_feature is None:
        found = raw.parent / "item_feature.parquet"
        item_feature = found if found.is_file() else None
    if truth_dir is None:
        found = raw.parent / "hidden"
        truth_dir = found if (found / "valid_truth.parquet").is_file() else None
    items = _item_facts(run, Path(item_feature) if item_feature else None)
    frame = validation_predictions(run).join(items, on="item_id", how="left", maintain_order="left")
    valid = run.features.split("valid")
    repeat = (np.asarray(valid.history) == np.asarray(valid.item_id)[:, None]).any(axis=1)  # (N,)
    frame = frame.with_columns(cold=pl.col("train_count") <= cold_max, repeat=pl.Series(repeat))
    if truth_dir is not None:
        frame = frame.with_columns(p_true=_truth(Path(truth_dir), frame.height))
        check_truth_matches(Path(truth_dir), frame["label"].to_numpy(), frame["p_true"].to_numpy(),
                            run.features.dir)
    return AnalysisData(run, frame, items, raw, Path(item_feature) if item_feature else None,
                        Path(truth_dir) if truth_dir else None, cold_max)


def _item_facts(run: LoadedRun, item_feature: Path | None) -> pl.DataFrame:
    """One row per item id 0..V-1: title, tags, train_count, train_ctr."""
    train = run.features.split("train")
    n_items = int(run.features.item_tags.shape[0])
    item_ids = np.asarray(train.item_id, dtype=np.int64)
    counts = np.bincount(item_ids, minlength=n_items)[:n_items]  # (V,)
    labels = np.asarray(train.label, dtype=np.float64)
    clicks = np.bincount(item_ids, weights=labels, minlength=n_items)[:n_items]  # (V,)
    ctr = np.divide(clicks, counts, out=np.full(n_items, np.nan), where=counts > 0)
    tags = np.asarray(run.features.item_tags)  # (V, T), 0 = padding
    items = pl.DataFrame({
        "item_id": np.arange(n_items, dtype=np.int64),
        "tags": [[int(t) for t in row if t != 0] for row in tags],
        "train_count": counts.astype(np.int64),
        "train_ctr": ctr,
    }, schema_overrides={"tags": pl.List(pl.Int64)}).with_columns(pl.col("train_ctr").fill_nan(None))
    titles = pl.DataFrame({"item_id": [], "title": []}, schema={"item_id": pl.Int64, "title": pl.String})
    if item_feature is not None:
        try:
            titles = pl.read_parquet(item_feature, columns=["item_id", "item_title"]).select(
                pl.col("item_id").cast(pl.Int64), pl.col("item_title").cast(pl.String).alias("title"))
        except Exception as error:  # polars raises several types for a missing column or a bad file
            raise QinError(f"{item_feature}: cannot read item_id, item_title ({error})") from error
    items = items.join(titles, on="item_id", how="left", maintain_order="left")
    return items.select("item_id", "title", "tags", "train_count", "train_ctr")


def _truth(truth_dir: Path, rows: int) -> pl.Series:
    path = truth_dir / "valid_truth.parquet"
    truth = read_truth(path, ["row", "p_true"]).sort("row")
    if truth.height != rows:
        raise QinError(f"{path}: {truth.height} rows, the validation split has {rows}")
    return truth["p_true"].cast(pl.Float64)


def example_row(frame: pl.DataFrame) -> int:
    """A readable attention example: a clicked row whose target is new to the history (so attention has to
    match by content, not by id), with the longest history, the one the model is surest of."""
    pool = frame
    for condition in (pl.col("label") == 1, ~pl.col("repeat") if "repeat" in frame.columns else pl.lit(True)):
        narrower = pool.filter(condition)
        pool = narrower if narrower.height else pool
    if pool.height == 0:
        raise QinError("the validation frame is empty")
    longest = pool.filter(pl.col("history_len") == pool["history_len"].max())
    return int(longest.sort(["prediction", "row"], descending=[True, False])["row"][0])


def user_targets(data: AnalysisData, row: int, limit: int = 4) -> list[int]:
    """The target item of `row` first, then the user's other validation candidates (up to `limit`)."""
    frame = data.frame
    user, item = frame["user_id"][row], int(frame["item_id"][row])
    others = frame.filter((pl.col("user_id") == user) & (pl.col("item_id") != item))["item_id"].unique(
        maintain_order=True).to_list()
    return [item, *others][:limit]
