"""`qin evaluate`: a run's metrics on the validation split, or on the test split against generated truth.

With a generator's truth folder (`qin synth`'s hidden/), the oracle's metrics (true click probabilities
on the same rows) are reported beside the model's; truth that belongs to another data set is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from qin.errors import QinError
from qin.features.raw import sha256_file
from qin.metrics import auc, calibration_ratio, gauc, logloss, normalized_entropy
from qin.predict import LoadedRun, score_split


def evaluate_run(run: LoadedRun, truth_dir: Path | None = None, split: str = "valid") -> dict[str, float]:
    """Metrics of the run on the validation split, or on the test split against a generator's truth.

    Keys: rows; auc; gauc (per-user AUC weighted by the user's rows, users of one class left out);
    logloss; ne (logloss over the entropy of the split's click rate); calibration (predicted over
    observed clicks). With a generator's truth folder, the oracle's (true click probabilities') values on
    the same rows beside them: oracle_auc, oracle_gauc, oracle_logloss, oracle_ne. An undefined metric is
    NaN (e.g. gauc when no user has both a click and a non-click). The test split has no labels of its
    own: `split="test"` needs the truth folder and reads labels from its test_truth.parquet (by ID).
    """
    if split not in ("valid", "test"):
        raise QinError(f"split must be valid or test, got {split!r}")
    arrays = run.features.split(split)
    users = np.asarray(arrays.user_id)
    probabilities = score_split(run, split)
    p_true = None
    if split == "test":
        if truth_dir is None:
            raise QinError("the test split has no labels: pass --truth <data>/hidden (generated data only)")
        check_test_truth_belongs(Path(truth_dir), run.features.manifest, run.features.dir)
        labels, p_true = _test_truth(Path(truth_dir), np.asarray(arrays.ids))
    else:
        if arrays.label is None:
            raise QinError(f"{run.features.dir}: the validation split has no labels")
        labels = np.asarray(arrays.label, dtype=np.float64)
        if truth_dir is not None:
            p_true = _valid_truth(Path(truth_dir), len(labels))
    result = {"rows": float(len(labels)), "auc": auc(labels, probabilities),
              "gauc": gauc(labels, probabilities, users), "logloss": logloss(labels, probabilities),
              "ne": normalized_entropy(labels, probabilities),
              "calibration": calibration_ratio(labels, probabilities)}
    if p_true is not None:
        result["oracle_auc"] = auc(labels, p_true)
        if split == "valid" and truth_dir is not None:  # always so: p_true on valid comes from truth_dir
            check_truth_matches(Path(truth_dir), labels, p_true, run.features.dir)
        result["oracle_gauc"] = gauc(labels, p_true, users)
        result["oracle_logloss"] = logloss(labels, p_true)
        result["oracle_ne"] = normalized_entropy(labels, p_true)
    return result


def _valid_truth(truth_dir: Path, rows: int) -> np.ndarray:
    """p_true of the validation rows, in row order, from valid_truth.parquet."""
    truth = read_truth(truth_dir / "valid_truth.parquet", ["row", "p_true"]).sort("row")
    if truth.height != rows:
        raise QinError(f"{truth_dir / 'valid_truth.parquet'}: {truth.height} rows, the validation split "
                       f"has {rows}")
    return truth["p_true"].to_numpy()


def check_test_truth_belongs(truth_dir: Path, manifest: dict, feature_dir: Path) -> None:
    """Test truth has no labels of the features' own to check it against: instead, the test.parquet that
    `qin synth` wrote beside this hidden/ folder must be the file the feature folder was built from."""
    written = truth_dir.parent / "MicroLens_1M_x1" / "test.parquet"
    recorded = manifest.get("sources", {}).get("test.parquet", {}).get("sha256")
    if not written.is_file() or recorded is None:
        raise QinError(f"{truth_dir}: cannot check that this truth belongs to the test split of "
                       f"{feature_dir} (no {written} beside it, or no record of the test file in the feature "
                       "folder); pass the hidden/ folder `qin synth` wrote with this data set")
    if sha256_file(written) != recorded:
        raise QinError(f"{truth_dir}: this truth belongs to another data set: {written} is not the test file "
                       f"{feature_dir} was built from; pass the hidden/ folder written with this data set")


def _test_truth(truth_dir: Path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, p_true) of the test rows, in row order, from test_truth.parquet (joined on ID)."""
    truth_path = truth_dir / "test_truth.parquet"
    truth = read_truth(truth_path, ["ID", "label", "p_true"])
    if truth.height != len(ids):
        raise QinError(f"{truth_path}: {truth.height} rows, the test split has {len(ids)}")
    rows = pl.DataFrame({"ID": ids.astype(np.int64)})
    joined = rows.join(truth, on="ID", how="left", maintain_order="left")
    if joined["label"].null_count():
        raise QinError(f"{truth_path}: holds no truth for some test IDs; is it this data set's hidden/?")
    return joined["label"].to_numpy().astype(np.float64), joined["p_true"].to_numpy()


def read_truth(path: Path, columns: list[str]) -> pl.DataFrame:
    """Columns of a generator's truth file; a missing, unreadable or incomplete file is a one-line error."""
    if not path.is_file():
        raise QinError(f"truth file not found: {path}")
    try:
        names = pl.read_parquet_schema(path).keys()
        missing = [column for column in columns if column not in names]
        if missing:
            raise QinError(f"{path}: missing column(s) {', '.join(missing)} (not a qin synth truth file)")
        return pl.read_parquet(path, columns=columns)
    except QinError:
        raise
    except Exception as error:  # polars raises several types for a corrupt file
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QinError(f"{path}: cannot read as parquet ({first_line})") from error


def check_truth_matches(truth_dir: Path, labels: np.ndarray, p_true: np.ndarray, feature_dir: Path) -> None:
    """Refuse truth that belongs to another data set: the generator's meta.json records the oracle AUC of
    its validation rows, and truth of another data set (same row count) gives another AUC on these labels.
    A truth folder without that record cannot be checked, so it is refused too."""
    meta_path = truth_dir / "meta.json"
    try:
        recorded = float(json.loads(meta_path.read_text())["auc"]["oracle_valid"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise QinError(f"{meta_path}: missing or unreadable ({type(error).__name__}), so this truth cannot "
                       f"be checked against the validation split of {feature_dir}; pass the hidden/ folder "
                       "`qin synth` wrote with this data set") from error
    oracle_auc = auc(labels, p_true)
    if abs(recorded - oracle_auc) > 1e-6:
        raise QinError(f"{truth_dir}: this truth does not belong to the validation split of {feature_dir} "
                       f"(its meta.json records oracle AUC {recorded:.6f}, these labels give "
                       f"{oracle_auc:.6f}); pass the hidden/ folder written with this data set")
