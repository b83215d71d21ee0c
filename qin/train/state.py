"""What a run carries between processes: loop counters, `last.pt`'s training state, the summary.

`last.pt` holds the model, optimizer, RNG states and `LoopState`, plain values and tensors only (it loads
with `weights_only=True`). A resumed run must train the same math: `resume_differences` compares the
fields that change it and ignores runtime settings (threads, device, where files go), which may differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from qin.checkpoints import load_checkpoint, save_checkpoint
from qin.config import Config, comparable
from qin.data import vocab_of
from qin.errors import QinError
from qin.features.io import FeatureSet
from qin.files import atomic_write_text, read_jsonl
from qin.model import CTRModel
from qin.runs import git_commit
from qin.runtime import load_weights

# Settings that change how fast or where a run goes, never what it computes: a resume may change them.
RUNTIME_KEYS = frozenset({
    ("train", "threads"), ("train", "device"), ("train", "compile"), ("train", "eval_batch_size"),
    ("train", "run_root"), ("data", "features_root"), ("model", "unique_items"), ("train", "tensorboard"),
})


@dataclass
class LoopState:
    """Everything besides weights that an interrupted run needs to continue exactly."""

    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # next batch to run within `epoch`
    global_step: int = 0
    best_auc: float = -math.inf
    best_epoch: int = -1
    best_step: int = -1
    bad_evaluations: int = 0  # consecutive evaluations without improvement
    stopped_early: bool = False
    finished: bool = False
    train_seconds: float = 0.0


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    best_auc: float
    best_epoch: int
    best_step: int
    valid_auc: float  # of the reloaded best weights
    valid_logloss: float
    steps: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def features_fingerprint(features: FeatureSet) -> dict[str, str]:
    """{input file name: sha256} of the raw files the feature folder was built from."""
    return {name: entry.get("sha256", "") for name, entry in features.manifest.get("sources", {}).items()}


def save_best(run_dir: Path, model: CTRModel, cfg: Config, features: FeatureSet, state: LoopState,
              metrics: dict[str, float]) -> None:
    """best.pt: the weights of the best evaluation with everything `qin predict` needs to rebuild them."""
    save_checkpoint(run_dir / "best.pt", {
        "config": cfg.to_dict(), "vocab": dataclasses.asdict(vocab_of(features)),
        "model_state": model.state_dict(),
        "epoch": state.epoch + 1, "step": state.global_step, "valid_auc": metrics["auc"],
        "valid_logloss": metrics["logloss"], **_feature_record(features), "git_commit": git_commit(),
    })


def save_last(run_dir: Path, model: CTRModel, optimizer: torch.optim.Optimizer, cfg: Config,
              state: LoopState, features: FeatureSet) -> None:
    """last.pt: the whole training state, enough for `--resume` to continue bit for bit."""
    # numpy's stubs type the no-argument call as a dict; it returns the legacy MT19937 state tuple.
    name, keys, position, has_gauss, cached_gaussian = cast(tuple[str, np.ndarray, int, int, float],
                                                            np.random.get_state())
    save_checkpoint(run_dir / "last.pt", {
        "config": cfg.to_dict(), "vocab": dataclasses.asdict(vocab_of(features)),
        "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
        "loop_state": dataclasses.asdict(state), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        # Plain values and tensors only, so the file loads with weights_only=True.
        "numpy_rng": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
        "python_rng": random.getstate(), **_feature_record(features),
    })


def _feature_record(features: FeatureSet) -> dict[str, Any]:
    return {"feature_dir": str(features.dir.resolve()), "mm_dim": int(features.item_emb.shape[1]),
            "feature_sources": features_fingerprint(features)}


def restore(path: Path, model: CTRModel, optimizer: torch.optim.Optimizer, cfg: Config,
            features: FeatureSet) -> LoopState:
    """Load last.pt into `model` and `optimizer`, restore the RNGs, return the loop counters.

    Raises:
        QinError: no last.pt, a config that changes the math, or other raw data than the run began with.
    """
    if not path.is_file() and (path.parent / "best.pt").is_file():
        raise QinError(f"cannot resume: {path} is missing, so the training state is gone; best.pt is still "
                       f"there (predict with it: `qin predict --run {path.parent}`), and --overwrite would "
                       "delete it: train a new run in another --run-dir to go on")
    if not path.is_file():
        raise QinError(f"cannot resume: {path} not found. The run stopped before its first training state "
                       "was saved (at the first evaluation or epoch end); start it again with --overwrite")
    saved = load_checkpoint(path)
    difference = resume_differences(saved["config"], cfg.to_dict())
    if difference:
        raise QinError(f"cannot resume {path.parent}: the config differs from the one it was started with in "
                       f"{difference} (see {path.parent / 'config.yaml'})")
    recorded, now = saved.get("feature_sources"), features_fingerprint(features)
    if recorded is not None and recorded != now:
        changed = sorted(name for name in set(recorded) | set(now) if recorded.get(name) != now.get(name))
        raise QinError(f"cannot resume {path.parent}: the raw data changed since the run started "
                       f"({', '.join(changed)} differ); start a new run")
    load_weights(model, saved["model_state"], path)
    optimizer.load_state_dict(saved["optimizer_state"])
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    numpy_rng = saved["numpy_rng"]
    np.random.set_state((numpy_rng["name"], numpy_rng["keys"].numpy().astype(np.uint32),
                         numpy_rng["position"], numpy_rng["has_gauss"], numpy_rng["cached_gaussian"]))
    random.setstate(saved["python_rng"])
    return LoopState(**saved["loop_state"])


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The keys that change the math and differ, as 'train.epochs (3 -> 5)'; '' when none do."""
    saved, current = comparable(saved), comparable(current)
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            # A key the run's config lacks came with a newer qin: the run used that key's default.
            if key not in old:
                continue
            if (section, key) not in RUNTIME_KEYS and old.get(key) != new.get(key):
                changes.append(f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return ", ".join(changes[:3]) + (", ..." if len(changes) > 3 else "")


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop evaluations logged after last.pt was saved (a resumed run logs them again) and a torn line."""
    if not path.is_file():
        return
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(record, default=str) + "\n" for record in kept))


def summary(result: FitResult, cfg: Config, features: FeatureSet) -> dict[str, Any]:
    """result.json (also appended to <run_root>/results.jsonl)."""
    return {
        "run_dir": str(result.run_dir), "model": cfg.model.name.value, "valid_auc": result.valid_auc,
        "valid_logloss": result.valid_logloss, "best_epoch": result.best_epoch, "best_step": result.best_step,
        "steps": result.steps, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 2), "feature_dir": str(features.dir),
        "config": cfg.to_dict(), "git_commit": git_commit(),
    }
