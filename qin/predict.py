"""Scoring with a trained run: the challenge submission, per-row validation predictions, evaluation.

Submission format (docs/data.md section 3): header `ID,<column>` (Task2 by default), one row per test
row in test-row order, IDs 0..n-1, probabilities in [0, 1]. The file is validated before it is
moved into place, and a JSON sidecar records where it came from.

Outputs never replace what qin did not write: `--out` must end in .csv, and an existing file at
it, at its sidecar (.json) or at its zip (.zip) is replaced only when it is a regular file that
looks like an earlier qin output of that kind. Anything else (a folder, a device such as
/dev/stdout, a symbolic link, someone's own file) is refused before the model is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from qin.batch import Batch, Vocab
from qin.config import Config
from qin.data import SplitTensors, item_tables_of, vocab_of
from qin.errors import QinError
from qin.features.io import FeatureSet, load_features
from qin.metrics import auc, calibration_ratio, gauc, logloss, normalized_entropy
from qin.model import CTRModel, build_model
from qin.runs import atomic_write_bytes, atomic_write_text, check_replaceable, git_commit, load_checkpoint
from qin.runtime import load_weights, predict_probabilities, resolve_device

SUBMISSION_COLUMNS = ("Task1", "Task2", "Task1&2")
PREDICTION_COLUMNS = ("row", "user_id", "item_id", "likes_level", "views_level", "history_len", "label",
                      "prediction")  # `qin predict --split valid`


@dataclass(frozen=True)
class LoadedRun:
    run_dir: Path
    config: Config
    model: CTRModel
    features: FeatureSet
    device: torch.device
    checkpoint: dict[str, Any]
    # Ways the features differ from the ones the run trained on (rebuilt from other raw files, another
    # history length): scoring still works, but the numbers are not the run's own. Said, not hidden.
    warnings: tuple[str, ...] = ()


def load_run(run_dir: Path, feature_dir: Path | None = None, device: str | None = None) -> LoadedRun:
    """Rebuild the best model of a run from its checkpoint (which carries config and vocab)."""
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / "best.pt" if run_dir.is_dir() else run_dir
    checkpoint = load_checkpoint(checkpoint_path)
    missing = [key for key in ("config", "vocab", "model_state", "feature_dir") if key not in checkpoint]
    if missing:
        raise QinError(f"{checkpoint_path}: lacks {', '.join(missing)} (a checkpoint from an older qin); "
                       f"pass the run folder ({checkpoint_path.parent}) so its best.pt is used")
    config = Config.from_dict(checkpoint["config"], source=f"{run_dir} (checkpoint config)")
    features = load_features(Path(feature_dir) if feature_dir else _trained_feature_dir(checkpoint, config))
    trained_vocab = Vocab(**checkpoint["vocab"])
    if vocab_of(features) != trained_vocab:
        raise QinError(f"{features.dir}: vocabulary {vocab_of(features)} differs from the one the checkpoint "
                       f"was trained with {trained_vocab}; preprocess with the same item table")
    trained_width = checkpoint.get("mm_dim")
    if trained_width is not None and features.item_emb.shape[1] != trained_width:
        raise QinError(f"{features.dir}: item_emb_d128 vectors are {features.item_emb.shape[1]} wide, the "
                       f"checkpoint was trained on {trained_width}-wide ones; use the item table it was "
                       "trained with")
    chosen = resolve_device(config.train.device if device is None else type(config.train.device)(device))
    model = build_model(config.model, trained_vocab, item_tables_of(features, config.data.mm_normalize))
    load_weights(model, checkpoint["model_state"], checkpoint_path)
    model.to(chosen).eval()
    return LoadedRun(run_dir if run_dir.is_dir() else run_dir.parent, config, model, features, chosen,
                     checkpoint, _feature_warnings(checkpoint, config, features))


def _feature_warnings(checkpoint: dict[str, Any], config: Config, features: FeatureSet) -> tuple[str, ...]:
    warnings = []
    recorded = checkpoint.get("feature_sources")
    if recorded:
        now = {name: entry.get("sha256", "") for name, entry in features.manifest.get("sources", {}).items()}
        changed = sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
        if changed:
            warnings.append(f"{features.dir} was built from other raw files than the run trained on "
                            f"({', '.join(changed)} differ): scores are not the run's recorded ones")
    if features.manifest.get("max_len") != config.data.max_len:
        warnings.append(f"{features.dir} keeps {features.manifest.get('max_len')} history items per row, the "
                        f"run trained on {config.data.max_len}")
    return tuple(warnings)


def _trained_feature_dir(checkpoint: dict[str, Any], config: Config) -> Path:
    """The feature folder the run trained on; if it was moved or renamed, the one its config names now."""
    recorded = Path(checkpoint["feature_dir"])
    if (recorded / "manifest.json").is_file():
        return recorded
    from qin.features.pipeline import feature_dir_of

    return feature_dir_of(config.data)


def score_split(run: LoadedRun, split: str) -> np.ndarray:
    tensors = SplitTensors.from_arrays(run.features.split(split))
    return predict_probabilities(run.model, tensors, run.config.train.eval_batch_size, run.device,
                                 run.config.train)


def validate_submission(frame: pl.DataFrame, expected_rows: int, column: str) -> None:
    """Raise QinError unless `frame` is a valid challenge submission."""
    if frame.columns != ["ID", column]:
        raise QinError(f"submission columns must be ['ID', '{column}'], got {frame.columns}")
    if frame.height != expected_rows:
        raise QinError(f"submission has {frame.height} rows, the test split has {expected_rows}")
    ids = frame["ID"].to_numpy()
    bad_id = np.flatnonzero(ids != np.arange(expected_rows))
    if bad_id.size:
        raise QinError(f"submission ID must be 0..{expected_rows - 1} in test-row order; row {bad_id[0]} "
                       f"has ID {ids[bad_id[0]]}")
    values = frame[column].to_numpy()
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if bad.size:
        raise QinError(f"submission {column} must be probabilities in [0, 1]; "
                       f"row {bad[0]} has {values[bad[0]]}")


def submission_paths(out: Path, make_zip: bool) -> dict[str, Path]:
    """The files `write_submission` writes, checked before any work: {"submission", "sidecar"[, "zip"]}.

    Raises:
        QinError: `out` does not end in .csv, or one of the paths holds something qin may not replace.
    """
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise QinError(f"{out}: a submission is a .csv file (its sidecar .json and zip .zip sit beside it); "
                       "use --out NAME.csv")
    paths = {"submission": out, "sidecar": out.with_suffix(".json")}
    if make_zip:
        paths["zip"] = out.with_suffix(".zip")
    check_replaceable(paths["submission"], _is_submission_csv, "a submission qin wrote (its .json "
                                                               "sidecar records its sha256)")
    check_replaceable(paths["sidecar"], _is_sidecar, "a qin submission sidecar")
    if make_zip:
        check_replaceable(paths["zip"], _is_submission_zip, "a submission zip holding prediction.csv")
    return paths


def _first_line(path: Path) -> str:
    with path.open("rb") as handle:
        return handle.readline(256).decode("utf-8", errors="replace")


def _is_submission_csv(path: Path) -> bool:
    """A submission qin wrote: its header is ID,<column> and its sidecar records its sha256."""
    header_ok = _first_line(path).rstrip("\r\n") in {f"ID,{column}" for column in SUBMISSION_COLUMNS}
    return header_ok and _recorded_by_sidecar(path, path.with_suffix(".json"), "submission")


def _recorded_by_sidecar(path: Path, sidecar_path: Path, name: str) -> bool:
    """Whether the sidecar beside `path` records `path`'s current sha256 (new or about to be replaced)."""
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("sha256"), dict):
        return False
    digest = _sha256_or_none(path)
    return digest is not None and digest in (sidecar["sha256"].get(name),
                                             (sidecar.get("replaces_sha256") or {}).get(name))


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _is_sidecar(path: Path) -> bool:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "submission" in content and "run_dir" in content


def _is_submission_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.namelist() != ["prediction.csv"]:
                return False
    except (OSError, zipfile.BadZipFile):
        return False
    return _recorded_by_sidecar(path, path.with_suffix(".json"), "zip")


def _is_prediction_frame(path: Path) -> bool:
    """An earlier `qin predict --split valid` output (exactly its columns)."""
    try:
        if path.suffix == ".parquet":
            names = list(pl.read_parquet_schema(path).keys())
        else:
            names = _first_line(path).strip().split(",")
    except Exception:  # unreadable: not ours
        return False
    return list(names) == list(PREDICTION_COLUMNS)


def write_submission(run: LoadedRun, out: Path, column: str = "Task2",
                     make_zip: bool = False) -> dict[str, Any]:
    """Score the test split, validate, write `out` (+ `out`.zip, + `out`.json sidecar) atomically."""
    if column not in SUBMISSION_COLUMNS:
        raise QinError(f"--column must be one of {', '.join(SUBMISSION_COLUMNS)}, got {column!r}")
    paths = submission_paths(out, make_zip)
    test = run.features.split("test")
    probabilities = score_split(run, "test")
    ids = np.asarray(test.ids) if test.ids is not None else np.arange(len(probabilities))
    frame = pl.DataFrame({"ID": ids.astype(np.int64), column: probabilities})
    validate_submission(frame, expected_rows=len(probabilities), column=column)
    buffer = io.BytesIO()
    frame.write_csv(buffer, float_precision=8)
    out = Path(out)
    files = {"submission": (out, buffer.getvalue())}
    if make_zip:
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("prediction.csv", buffer.getvalue())  # the name Codabench expects, at the top
        files["zip"] = (paths["zip"], zipped.getvalue())
    # The sidecar records each file's sha256: it is how a later run knows a file at these paths is qin's
    # (a user's own ID,Task2 file looks the same). It is written first, naming the digests of the files
    # it is about to replace too, so a crash between the writes never makes qin's own file look foreign.
    sidecar: dict[str, Any] = {
        **{name: str(path) for name, (path, _) in files.items()}, "rows": frame.height, "column": column,
        "run_dir": str(run.run_dir),
        "checkpoint_epoch": run.checkpoint.get("epoch"), "valid_auc": run.checkpoint.get("valid_auc"),
        "valid_logloss": run.checkpoint.get("valid_logloss"), "feature_dir": str(run.features.dir),
        "config": run.config.to_dict(), "trained_at_commit": run.checkpoint.get("git_commit"),
        "git_commit": git_commit(),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, (_, data) in files.items()},
        "replaces_sha256": {name: _sha256_or_none(path) for name, (path, _) in files.items()},
    }
    atomic_write_text(paths["sidecar"], json.dumps(sidecar, indent=2, default=str))
    for path, data in files.values():
        atomic_write_bytes(path, data)
    sidecar["replaces_sha256"] = {name: None for name in files}
    atomic_write_text(paths["sidecar"], json.dumps(sidecar, indent=2, default=str))
    return sidecar


def validation_predictions(run: LoadedRun) -> pl.DataFrame:
    """Per-row validation predictions for analysis: row, user, item, label, history length, p."""
    valid = run.features.split("valid")
    probabilities = score_split(run, "valid")
    history = np.asarray(valid.history)
    return pl.DataFrame({
        "row": np.arange(len(probabilities), dtype=np.int64),
        "user_id": np.asarray(valid.user_id, dtype=np.int64),
        "item_id": np.asarray(valid.item_id, dtype=np.int64),
        "likes_level": np.asarray(valid.likes_level, dtype=np.int64) - 1,  # back to the raw 0..9 level
        "views_level": np.asarray(valid.views_level, dtype=np.int64) - 1,
        "history_len": (history != 0).sum(axis=1).astype(np.int64),
        "label": np.asarray(valid.label, dtype=np.float64),
        "prediction": probabilities,
    })


def check_frame_output(out: Path) -> None:
    """Refuse a per-row predictions path with another suffix or holding something qin did not write."""
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise QinError(f"{out}: output must end in .csv or .parquet")
    check_replaceable(out, _is_prediction_frame, "an earlier per-row prediction file")


def write_frame(frame: pl.DataFrame, out: Path) -> None:
    """CSV or parquet by suffix, atomically."""
    out = Path(out)
    check_frame_output(out)
    buffer = io.BytesIO()
    if out.suffix == ".parquet":
        frame.write_parquet(buffer)
    else:
        frame.write_csv(buffer)
    atomic_write_bytes(out, buffer.getvalue())


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


def one_request(run: LoadedRun, history: np.ndarray, candidates: np.ndarray, likes: np.ndarray,
                views: np.ndarray) -> np.ndarray:
    """Score one user against many candidate items (online-style request): (C,) probabilities."""
    count = len(candidates)
    batch = Batch(
        target_item=torch.as_tensor(candidates, dtype=torch.long),
        history=torch.as_tensor(history, dtype=torch.long).view(1, -1).expand(count, -1),
        likes_level=torch.as_tensor(likes, dtype=torch.long),
        views_level=torch.as_tensor(views, dtype=torch.long),
    ).to(run.device)
    with torch.no_grad():
        return torch.sigmoid(run.model(batch).float()).cpu().numpy()
