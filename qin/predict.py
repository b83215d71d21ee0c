"""Scoring with a trained run: loading it, scoring a split, per-row validation predictions, one request.

`load_run` rebuilds a run's best model from its checkpoint (which carries config and vocab) on the
features it trained on, and says how the features differ when they were rebuilt. The challenge
submission is written by qin.submission, `qin evaluate` is qin.evaluation; both score through here.

A per-row predictions file (`qin predict --split valid`) is a .csv or .parquet; an existing file at its
path is replaced only when it is an earlier one (exactly its columns), never anything else.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from qin.batch import Vocab
from qin.checkpoints import load_checkpoint
from qin.config import Config
from qin.data import SplitTensors, item_tables_of, vocab_of
from qin.errors import QinError
from qin.features.io import FeatureSet, load_features
from qin.files import atomic_write_bytes, check_replaceable, first_line
from qin.model import CTRModel, build_model
from qin.runtime import autocast_context, load_weights, predict_probabilities, resolve_device
from qin.serve import score_request

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
    from qin.features.folder import feature_dir_of

    return feature_dir_of(config.data)


def score_split(run: LoadedRun, split: str) -> np.ndarray:
    tensors = SplitTensors.from_arrays(run.features.split(split))
    return predict_probabilities(run.model, tensors, run.config.train.eval_batch_size, run.device,
                                 run.config.train)


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


def _is_prediction_frame(path: Path) -> bool:
    """An earlier `qin predict --split valid` output (exactly its columns)."""
    try:
        if path.suffix == ".parquet":
            names = list(pl.read_parquet_schema(path).keys())
        else:
            names = first_line(path).strip().split(",")
    except Exception:  # unreadable: not ours
        return False
    return list(names) == list(PREDICTION_COLUMNS)


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


def one_request(run: LoadedRun, history: np.ndarray, candidates: np.ndarray, likes: np.ndarray,
                views: np.ndarray) -> np.ndarray:
    """Score one user against many candidate items (online-style request): (C,) probabilities.

    QIN-family models in eval mode take qin.serve's fast path (per-item tables built on the first request,
    the history shared by all candidates); every other model the plain one. Both give the same numbers.
    Under the run's bf16 autocast (train.bf16 on CUDA, train.cpu_bf16 on CPU), as its scoring runs.
    """
    autocast = autocast_context(run.device, run.config.train) if run.config is not None else nullcontext()
    with autocast:
        return score_request(run.model, run.device, history, candidates, likes, views)
