"""`fit`: set up, run epochs, evaluate and schedule, finish. FuxiCTR 2.3.7's loop as QIN ran it.

Per evaluation (once an epoch, or every `eval_steps`): AUC and logloss on the whole validation split;
an improvement (AUC >= best + min_delta) saves `best.pt`, anything else counts towards `patience`
and halves the LR (floor `min_lr`) while training goes on from the *current* weights, as the
reference does. After the loop the best weights are reloaded and the validation split is scored once
more. `last.pt` is written atomically after every evaluation and every epoch, so `--resume` continues
exactly (see `qin.train.state`).

Guards: a one-class split is refused before the first step; a step whose loss is NaN, infinite or above
`train.max_loss` stops the run naming the step, before anything of that step is saved.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from qin import distributed
from qin.batch import Batch
from qin.checkpoints import load_checkpoint
from qin.config import Config, TrainConfig
from qin.data import SplitTensors, item_tables_of, vocab_of
from qin.errors import QinError
from qin.features.io import FeatureSet
from qin.files import append_jsonl, atomic_write_text, check_appendable, read_jsonl
from qin.metrics import auc, logloss
from qin.model import CTRModel, build_model
from qin.runtime import load_weights, predict_probabilities, resolve_device, seed_everything
from qin.train.state import FitResult, LoopState, restore, save_best, save_last, summary, trim_metrics
from qin.train.step import (
    apply_warmup,
    check_loss,
    check_two_classes,
    epoch_batches,
    make_optimizer,
    make_train_step,
)


@dataclass
class Training:
    """Everything one `fit` works with, built once by `_set_up` (in place of a dozen parameters)."""

    cfg: Config
    features: FeatureSet
    run_dir: Path
    dist: distributed.Context
    device: torch.device
    model: CTRModel
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[Batch], torch.Tensor]
    train_split: SplitTensors
    valid_split: SplitTensors
    steps_per_epoch: int
    console: Console
    evaluations: list[dict[str, Any]]
    tensorboard: Any = None  # a torch SummaryWriter when train.tensorboard is on (rank 0 only)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def fit(cfg: Config, features: FeatureSet, run_dir: Path, resume: bool = False, progress: bool = True,
        console: Console | None = None, on_step: Callable[[int], None] | None = None) -> FitResult:
    """Train `cfg.model` on the features, evaluating on valid; see the module docstring.

    `on_step(global_step)` is called after every optimizer step (tests use it to interrupt a
    run). With torchrun, every process calls `fit`; rank 0 alone writes files and logs.
    """
    training = _set_up(cfg, features, Path(run_dir), console or Console())
    state = LoopState()
    if resume:
        state = restore(training.run_dir / "last.pt", training.model, training.optimizer, cfg, features)
        if training.dist.is_main:
            if state.global_step and not training.metrics_path.is_file():
                training.console.log(f"[yellow]warning:[/yellow] {training.metrics_path} is missing: the "
                                     f"evaluations before step {state.global_step} are not in the history")
            trim_metrics(training.metrics_path, state.global_step)
            if state.finished:
                training.console.log(f"{run_dir} had already finished; its best.pt is scored again, "
                                     "nothing trains")
        training.evaluations.extend(read_jsonl(training.metrics_path))
    elif training.dist.is_main:
        training.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(training.run_dir / "config.yaml", cfg.to_yaml())
        training.metrics_path.unlink(missing_ok=True)
    already_finished = state.finished

    bar = _progress_bar(training.console, enabled=progress and training.dist.is_main)
    with bar:
        task = bar.add_task("train", total=training.steps_per_epoch, epoch=state.epoch + 1, loss=float("nan"),
                            rate=0.0)
        while not state.finished and state.epoch < cfg.train.epochs:
            _run_epoch(training, state, bar, task, on_step)
            _save_last(training, state)
        state.finished = True
        _save_last(training, state)
    return _finish(training, state, summarise=not already_finished)


def _set_up(cfg: Config, features: FeatureSet, run_dir: Path, console: Console) -> Training:
    """Device, seeds, model, optimizer, splits and the compiled step, after the checks that need them."""
    dist = distributed.context()
    train_cfg = cfg.train
    device = distributed.device_for(dist) if dist.world_size > 1 else resolve_device(train_cfg.device)
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)
    if dist.is_main:
        check_appendable(Path(train_cfg.run_root) / "results.jsonl")  # now, not after the whole run
    model = _build(cfg, features, device)
    train_split = SplitTensors.from_arrays(features.split("train"))
    valid_split = SplitTensors.from_arrays(features.split("valid"))
    if train_split.label is None:
        raise QinError(f"{features.dir}: the train split has no labels")
    check_two_classes(features, "valid", valid_split)
    check_two_classes(features, "train", train_split)
    if dist.world_size > 1 and train_cfg.batch_size % dist.world_size:
        # Each process takes every W-th row of each global batch (see step.shard_order).
        raise QinError(f"train.batch_size ({train_cfg.batch_size}) must be divisible by the number "
                       f"of processes ({dist.world_size})")
    if device.type == "cuda":
        # The whole split fits in GPU memory (3.6M x 64 int32 ids ~ 0.9 GB): batches become
        # on-device gathers with no host-to-device copy per step.
        train_split = train_split.to(device)
    optimizer = make_optimizer(model, train_cfg)
    step_fn = make_train_step(model, distributed.wrap(model, dist, device), optimizer, cfg, device)
    if train_cfg.compile and device.type == "cuda":
        step_fn = torch.compile(step_fn)
    full_batches, tail_rows = divmod(train_split.rows, train_cfg.batch_size)
    # A tail smaller than the process count is dropped under DDP (see step.shard_order).
    steps_per_epoch = full_batches + (1 if tail_rows and tail_rows >= dist.world_size else 0)
    writer = _tensorboard_writer(run_dir) if train_cfg.tensorboard and dist.is_main else None
    return Training(cfg, features, run_dir, dist, device, model, optimizer, step_fn, train_split, valid_split,
                    steps_per_epoch, console, evaluations=[], tensorboard=writer)


def _tensorboard_writer(run_dir: Path) -> Any:
    """A SummaryWriter on <run>/tensorboard; the package is optional, so its absence is a clear error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise QinError("train.tensorboard: true needs the tensorboard package (pip install tensorboard); "
                       "metrics.jsonl has every evaluation without it") from error
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def _build(cfg: Config, features: FeatureSet, device: torch.device) -> CTRModel:
    """The model on its device; a model too large for memory is a one-line error naming the knob."""
    try:
        tables = item_tables_of(features, cfg.data.mm_normalize)
        return build_model(cfg.model, vocab_of(features), tables).to(device)
    except (RuntimeError, MemoryError) as error:
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        first_line = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise QinError(f"the model does not fit in {device.type} memory ({first_line}); lower "
                       f"model.embedding_dim (now {cfg.model.embedding_dim}) or the layer widths") from error


def _run_epoch(training: Training, state: LoopState, bar: Progress, task: TaskID,
               on_step: Callable[[int], None] | None) -> None:
    """The steps of `state.epoch` from `state.batch_in_epoch` on, evaluating when due; at the epoch's
    end `state` moves to the next epoch."""
    train_cfg = training.cfg.train
    bar.update(task, completed=state.batch_in_epoch, epoch=state.epoch + 1)
    loss_sum, loss_rows, window_rows, window_seconds = 0.0, 0, 0, 0.0
    for batch in epoch_batches(training.train_split, train_cfg, state, training.dist):
        started = time.perf_counter()
        batch = batch.to(training.device, non_blocking=True)
        apply_warmup(training.optimizer, train_cfg, state.global_step)
        loss_value = float(training.step_fn(batch))  # float() waits for the device: honest timings
        check_loss(loss_value, state, train_cfg)
        seconds = time.perf_counter() - started
        state.train_seconds += seconds
        state.global_step += 1
        state.batch_in_epoch += 1
        loss_sum += loss_value * batch.size
        loss_rows += batch.size
        window_rows += batch.size * training.dist.world_size
        window_seconds += seconds
        bar.update(task, advance=1, loss=loss_sum / loss_rows, rate=window_rows / window_seconds)
        if on_step is not None:
            on_step(state.global_step)
        at_epoch_end = state.batch_in_epoch >= training.steps_per_epoch
        at_max_steps = train_cfg.max_steps is not None and state.global_step >= train_cfg.max_steps
        due = at_epoch_end if train_cfg.eval_steps is None else state.global_step % train_cfg.eval_steps == 0
        # The last step always evaluates: with eval_steps longer than the run there would otherwise
        # be no evaluation, hence no best.pt, after all the training.
        at_last_step = at_epoch_end and state.epoch == train_cfg.epochs - 1
        if due or at_max_steps or (at_last_step and state.best_step < 0):
            _evaluate_and_schedule(training, state, loss_sum / loss_rows, window_rows / window_seconds)
            window_rows, window_seconds = 0, 0.0
            state.finished = state.finished or at_max_steps
            if state.finished:
                return
            if not at_epoch_end:
                _save_last(training, state)
    state.epoch += 1
    state.batch_in_epoch = 0


def evaluate(model: CTRModel, split: SplitTensors, device: torch.device, train_cfg: TrainConfig,
             dist: distributed.Context) -> dict[str, float]:
    """AUC and logloss over the WHOLE split: with several processes each scores a shard and the
    probabilities are gathered before the metric (an average of per-shard AUCs is not the AUC)."""
    shard = split.shard(dist.rank, dist.world_size) if dist.world_size > 1 else split
    if split.label is None or shard.label is None:  # a shard has labels exactly when its split does
        raise QinError("the validation split has no labels: cannot evaluate")
    probabilities = predict_probabilities(model, shard, train_cfg.eval_batch_size, device, train_cfg)
    labels = shard.label.double().numpy()
    if dist.world_size > 1:
        probabilities = distributed.gather_interleaved(probabilities, split.rows, dist)
        labels = split.label.double().numpy()
    if not np.isfinite(probabilities).all():
        bad = int(np.flatnonzero(~np.isfinite(probabilities))[0])
        raise QinError(f"the model predicts {probabilities[bad]} for validation row {bad}: its weights hold "
                       "NaN or infinite values (training diverged); lower train.learning_rate")
    return {"auc": auc(labels, probabilities), "logloss": logloss(labels, probabilities)}


def _evaluate_and_schedule(training: Training, state: LoopState, train_loss: float,
                           samples_per_second: float) -> None:
    """Evaluate; save best or decay the LR; decide early stopping (FuxiCTR checkpoint_and_earlystop);
    log the evaluation to metrics.jsonl and the console."""
    train_cfg = training.cfg.train
    metrics = evaluate(training.model, training.valid_split, training.device, train_cfg, training.dist)
    if not math.isfinite(metrics["auc"]):
        raise QinError(f"validation AUC is undefined at step {state.global_step} (epoch {state.epoch + 1}): "
                       "the validation split has a single class or the model predicts NaN; stopped")
    lr_used = training.optimizer.param_groups[0]["lr"]
    improved = metrics["auc"] >= state.best_auc + train_cfg.min_delta
    if improved:
        state.best_auc, state.best_epoch, state.best_step = metrics["auc"], state.epoch + 1, state.global_step
        state.bad_evaluations = 0
        if training.dist.is_main:
            save_best(training.run_dir, training.model, training.cfg, training.features, state, metrics)
    else:
        state.bad_evaluations += 1
        for group in training.optimizer.param_groups:
            group["lr"] = max(group["lr"] * train_cfg.lr_decay_factor, train_cfg.min_lr)
        if state.bad_evaluations >= train_cfg.patience:
            state.stopped_early = True
            state.finished = True
    record = {"epoch": state.epoch + 1, "step": state.global_step, "lr": lr_used, "train_loss": train_loss,
              "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"], "improved": improved,
              "best_auc": state.best_auc, "samples_per_second": samples_per_second}
    training.evaluations.append(record)
    if training.dist.is_main:
        append_jsonl(training.metrics_path, record)
        training.console.log(_format_record(record))
        if training.tensorboard is not None:
            for key in ("train_loss", "valid_auc", "valid_logloss", "lr", "samples_per_second"):
                training.tensorboard.add_scalar(key, record[key], global_step=state.global_step)
            training.tensorboard.flush()


def _save_last(training: Training, state: LoopState) -> None:
    if training.dist.is_main:
        save_last(training.run_dir, training.model, training.optimizer, training.cfg, state,
                  training.features)


def _finish(training: Training, state: LoopState, summarise: bool) -> FitResult:
    """Reload the best weights, score valid once more, write result.json (unless already written)."""
    distributed.barrier(training.dist)
    if training.tensorboard is not None:
        training.tensorboard.close()
    best_path = training.run_dir / "best.pt"
    load_weights(training.model, load_checkpoint(best_path)["model_state"], best_path)
    final = evaluate(training.model, training.valid_split, training.device, training.cfg.train, training.dist)
    result = FitResult(run_dir=training.run_dir, best_auc=state.best_auc, best_epoch=state.best_epoch,
                       best_step=state.best_step, valid_auc=final["auc"], valid_logloss=final["logloss"],
                       steps=state.global_step, epochs_run=state.epoch + (1 if state.batch_in_epoch else 0),
                       stopped_early=state.stopped_early, train_seconds=state.train_seconds,
                       evaluations=training.evaluations)
    if training.dist.is_main and summarise:  # a finished run was summarised when it finished
        record = summary(result, training.cfg, training.features)
        atomic_write_text(training.run_dir / "result.json", json.dumps(record, indent=2, default=str))
        append_jsonl(Path(training.cfg.train.run_root) / "results.jsonl", record)
    return result


def _format_record(record: dict[str, Any]) -> str:
    mark = "[green]improved[/green]" if record["improved"] else "[yellow]no improvement[/yellow]"
    return (f"epoch {record['epoch']} step {record['step']}: train loss {record['train_loss']:.4f}  "
            f"valid AUC {record['valid_auc']:.5f}  logloss {record['valid_logloss']:.4f}  "
            f"lr {record['lr']:.2e}  {mark}")


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:,.0f} samples/s"),
        TimeElapsedColumn(), console=console, disable=not enabled, transient=False,
    )
