"""The training loop: FuxiCTR 2.3.7's `fit` as QIN ran it (model.md section 5), made resumable.

Per step: forward -> mean BCE + lambda/2 * ||embedding tables||^2 -> backward -> clip grad-norm
-> Adam step. Per evaluation (once an epoch, or every `eval_steps`): AUC and logloss on the
whole validation split; an improvement (AUC >= best + min_delta) saves `best.pt`, anything else
counts towards `patience` and halves the LR (floor `min_lr`) while training goes on from the
*current* weights, as the reference does. After the loop the best weights are reloaded and the
validation split is scored once more.

Resuming: `last.pt` (written atomically after every evaluation and every epoch) carries the
model, optimizer, RNG states and loop counters; the epoch's row order is a pure function of
(seed, epoch), so a resumed run replays exactly the batches an uninterrupted run would see.

Guards: a validation split with one class is refused before the first step (AUC is undefined, so
no checkpoint could ever be chosen); a step whose loss is NaN, infinite or above `train.max_loss`
stops the run with an error naming the step, before anything of that step is saved, so best.pt
and last.pt stay those of the last good evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qin import distributed
from qin.config import Config, Regularization, TrainConfig, comparable
from qin.data import SplitTensors, epoch_order, item_tables_of, iterate_batches, vocab_of
from qin.errors import QinError
from qin.features.io import FeatureSet
from qin.metrics import auc, logloss
from qin.model import CTRModel, build_model
from qin.runs import (
    append_jsonl,
    atomic_write_text,
    check_appendable,
    git_commit,
    load_checkpoint,
    read_jsonl,
    save_checkpoint,
)
from qin.runtime import autocast_context, load_weights, predict_probabilities, resolve_device, seed_everything


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


def evaluate(model: CTRModel, split: SplitTensors, device: torch.device, train_cfg: TrainConfig,
             dist: distributed.Context) -> dict[str, float]:
    """AUC and logloss over the WHOLE split: with several processes each scores a shard and the
    probabilities are gathered before the metric (an average of per-shard AUCs is not the AUC)."""
    if split.label is None:
        raise QinError("the validation split has no labels: cannot evaluate")
    shard = split.shard(dist.rank, dist.world_size) if dist.world_size > 1 else split
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


def fit(cfg: Config, features: FeatureSet, run_dir: Path, resume: bool = False, progress: bool = True,
        console: Console | None = None, on_step: Callable[[int], None] | None = None) -> FitResult:
    """Train `cfg.model` on the features, evaluating on valid; see the module docstring.

    `on_step(global_step)` is called after every optimizer step (tests use it to interrupt a
    run). With torchrun, every process calls `fit`; rank 0 alone writes files and logs.
    """
    console = console or Console()
    dist = distributed.context()
    train_cfg = cfg.train
    run_dir = Path(run_dir)
    device = distributed.device_for(dist) if dist.world_size > 1 else resolve_device(train_cfg.device)
    if train_cfg.threads is not None:
        torch.set_num_threads(train_cfg.threads)
    seed_everything(train_cfg.seed)

    vocab = vocab_of(features)
    if dist.is_main:
        check_appendable(Path(train_cfg.run_root) / "results.jsonl")  # now, not after the whole run
    try:
        model = build_model(cfg.model, vocab, item_tables_of(features, cfg.data.mm_normalize)).to(device)
    except (RuntimeError, MemoryError) as error:
        if "alloc" not in str(error).lower() and not isinstance(error, MemoryError):
            raise
        first_line = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise QinError(f"the model does not fit in {device.type} memory ({first_line}); lower "
                       f"model.embedding_dim (now {cfg.model.embedding_dim}) or the layer widths") from error
    train_split = SplitTensors.from_arrays(features.split("train"))
    valid_split = SplitTensors.from_arrays(features.split("valid"))
    if train_split.label is None:
        raise QinError(f"{features.dir}: the train split has no labels")
    check_two_classes(features, "valid", valid_split)
    check_two_classes(features, "train", train_split)
    if dist.world_size > 1:
        # Each process takes every W-th row of the globally shuffled order (see _shard_order),
        # so W processes with batch b/W see together what one process with batch b sees.
        if train_cfg.batch_size % dist.world_size:
            raise QinError(f"train.batch_size ({train_cfg.batch_size}) must be divisible by the number "
                           f"of processes ({dist.world_size})")
    if device.type == "cuda":
        # The whole split fits in GPU memory (3.6M x 64 int32 ids ~ 0.9 GB): batches become
        # on-device gathers with no host-to-device copy per step.
        train_split = SplitTensors(**{k: None if v is None else v.to(device)
                                      for k, v in dataclasses.asdict(train_split).items()})

    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.learning_rate)
    state = LoopState()
    if resume:
        state = _restore(run_dir / "last.pt", model, optimizer, cfg, features)
        if dist.is_main:
            _trim_metrics(run_dir / "metrics.jsonl", state.global_step)
            if state.finished:
                console.log(f"{run_dir} had already finished; its best.pt is scored again, nothing trains")
    elif dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    already_finished = state.finished

    train_model: torch.nn.Module = distributed.wrap(model, dist, device)
    step_fn = make_train_step(model, train_model, optimizer, cfg, device)
    if train_cfg.compile and device.type == "cuda":
        step_fn = torch.compile(step_fn)

    full_batches, tail_rows = divmod(train_split.rows, train_cfg.batch_size)
    # A tail smaller than the process count is dropped under DDP (see _shard_order).
    steps_per_epoch = full_batches + (1 if tail_rows and tail_rows >= dist.world_size else 0)
    eval_every = train_cfg.eval_steps
    metrics_path = run_dir / "metrics.jsonl"
    evaluations = [] if not resume else read_jsonl(metrics_path)

    bar = _progress_bar(console, enabled=progress and dist.is_main)
    with bar:
        task = bar.add_task("train", total=steps_per_epoch, epoch=state.epoch + 1, loss=float("nan"),
                            rate=0.0)
        while not state.finished and state.epoch < train_cfg.epochs:
            bar.update(task, completed=state.batch_in_epoch, epoch=state.epoch + 1)
            loss_sum, loss_rows, window_rows, window_seconds = 0.0, 0, 0, 0.0
            for batch in _epoch_batches(train_split, train_cfg, state, dist):
                started = time.perf_counter()
                batch = batch.to(device, non_blocking=True)
                apply_warmup(optimizer, train_cfg, state.global_step)
                loss_value = float(step_fn(batch))  # float() waits for the device: honest timings
                check_loss(loss_value, state, train_cfg)
                seconds = time.perf_counter() - started
                state.train_seconds += seconds
                state.global_step += 1
                state.batch_in_epoch += 1
                loss_sum += loss_value * batch.size
                loss_rows += batch.size
                window_rows += batch.size * dist.world_size
                window_seconds += seconds
                bar.update(task, advance=1, loss=loss_sum / loss_rows, rate=window_rows / window_seconds)
                if on_step is not None:
                    on_step(state.global_step)
                at_epoch_end = state.batch_in_epoch >= steps_per_epoch
                at_max_steps = train_cfg.max_steps is not None and state.global_step >= train_cfg.max_steps
                due = at_epoch_end if eval_every is None else state.global_step % eval_every == 0
                # The last step always evaluates: with eval_steps longer than the run there would
                # otherwise be no evaluation, hence no best.pt, after all the training.
                at_last_step = at_epoch_end and state.epoch == train_cfg.epochs - 1
                if due or at_max_steps or (at_last_step and state.best_step < 0):
                    record = _evaluate_and_schedule(model, valid_split, device, cfg, state, optimizer,
                                                    run_dir, dist, vocab, features, loss_sum / loss_rows,
                                                    window_rows / window_seconds)
                    window_rows, window_seconds = 0, 0.0
                    evaluations.append(record)
                    if dist.is_main:
                        append_jsonl(metrics_path, record)
                        console.log(_format_record(record))
                    state.finished = state.finished or at_max_steps
                    if state.finished:
                        break
                    if not at_epoch_end:
                        _save_last(run_dir, model, optimizer, cfg, state, dist, features)
            else:  # the epoch ran to its end
                state.epoch += 1
                state.batch_in_epoch = 0
            _save_last(run_dir, model, optimizer, cfg, state, dist, features)
        state.finished = True
        _save_last(run_dir, model, optimizer, cfg, state, dist, features)

    distributed.barrier(dist)
    best = load_checkpoint(run_dir / "best.pt")
    load_weights(model, best["model_state"], run_dir / "best.pt")
    final = evaluate(model, valid_split, device, train_cfg, dist)
    result = FitResult(run_dir=run_dir, best_auc=state.best_auc, best_epoch=state.best_epoch,
                       best_step=state.best_step, valid_auc=final["auc"], valid_logloss=final["logloss"],
                       steps=state.global_step, epochs_run=state.epoch + (1 if state.batch_in_epoch else 0),
                       stopped_early=state.stopped_early, train_seconds=state.train_seconds,
                       evaluations=evaluations)
    if dist.is_main and not already_finished:  # a finished run was summarised when it finished
        summary = _summary(result, cfg, features)
        atomic_write_text(run_dir / "result.json", json.dumps(summary, indent=2, default=str))
        append_jsonl(Path(train_cfg.run_root) / "results.jsonl", summary)
    return result


def check_two_classes(features: FeatureSet, name: str, split: SplitTensors) -> None:
    """Refuse a split whose labels are all 0 or all 1: on valid the AUC that picks checkpoints is
    undefined, on train there is nothing to learn (e.g. positive-only raw logs)."""
    labels = split.label
    if labels is None or labels.numel() == 0:
        return
    positives = int(labels.sum().item())
    if positives in (0, labels.numel()):
        only = "1 (positive)" if positives else "0 (negative)"
        why = ("the validation AUC that picks the best checkpoint is undefined" if name == "valid"
               else "there is nothing to tell apart")
        raise QinError(f"{features.dir / name}: every one of the {labels.numel():,} labels is {only}; {why}. "
                       f"The {name} split needs both clicks and non-clicks")


def check_loss(loss_value: float, state: LoopState, train_cfg: TrainConfig) -> None:
    """Stop a run whose step loss is NaN, infinite or above `train.max_loss` (it has diverged).

    Called before anything of the step is saved: best.pt and last.pt stay those of the last
    evaluation before it, and `--resume` after lowering the learning rate starts from there.
    """
    step = state.global_step + 1  # this step's 1-based number, as metrics.jsonl counts
    if math.isfinite(loss_value) and (train_cfg.max_loss is None or loss_value <= train_cfg.max_loss):
        return
    what = (f"became {loss_value}" if not math.isfinite(loss_value)
            else f"reached {loss_value:.4g} > train.max_loss {train_cfg.max_loss:g}")
    kept = (f"best.pt (valid AUC {state.best_auc:.5f}, step {state.best_step}) and last.pt are from before it"
            if state.best_step > 0 else "no checkpoint was saved before it")
    raise QinError(f"training diverged: the loss {what} at step {step} (epoch {state.epoch + 1}); stopped. "
                   f"{kept}. Lower train.learning_rate (now {train_cfg.learning_rate:g}) or "
                   "train.max_grad_norm and train again")


def make_train_step(model: CTRModel, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    cfg: Config, device: torch.device) -> Callable:
    """One optimizer step on a batch; returns the loss (data + regularisers) as a 0-dim tensor."""
    train_cfg = cfg.train
    embedding_ids = {id(p) for p in model.embedding_parameters()}
    net_parameters = [p for p in model.parameters() if id(p) not in embedding_ids]

    def step(batch) -> torch.Tensor:
        model.train()
        with autocast_context(device, train_cfg):
            if train_model is model:
                data_loss, _ = model.loss(batch)
            else:  # DDP: gradients are averaged through the wrapper's forward
                data_loss, _ = train_model(batch)
        loss = data_loss.float()
        if train_cfg.embedding_regularizer > 0:
            used = batch if train_cfg.regularization is Regularization.batch else None
            loss = loss + 0.5 * train_cfg.embedding_regularizer * model.embedding_l2(used)
        if train_cfg.net_regularizer > 0:
            loss = loss + 0.5 * train_cfg.net_regularizer * sum(p.pow(2).sum() for p in net_parameters)
        loss.backward()
        if train_cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def apply_warmup(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, global_step: int) -> None:
    """Set the LR of step `global_step` (0-based) during the linear warm-up; leave it alone afterwards.

    The ramp owns the LR until it ends (an evaluation inside it does not decay it); plateau decay applies
    from then on. A pure function of the step, so a resumed run ramps exactly as an uninterrupted one.
    """
    if global_step > train_cfg.warmup_steps or train_cfg.warmup_steps == 0:
        return
    fraction = min(global_step + 1, train_cfg.warmup_steps) / train_cfg.warmup_steps
    for group in optimizer.param_groups:
        group["lr"] = train_cfg.learning_rate * fraction


def _epoch_batches(split: SplitTensors, train_cfg: TrainConfig, state: LoopState,
                   dist: distributed.Context) -> Iterator:
    order = epoch_order(split.rows, train_cfg.seed, state.epoch).to(split.item_id.device)
    batch_size = train_cfg.batch_size
    if dist.world_size > 1:
        order, batch_size = _shard_order(order, batch_size, dist)
    return iterate_batches(split, batch_size, order, start_batch=state.batch_in_epoch)


def _shard_order(order: torch.Tensor, batch_size: int, dist: distributed.Context) -> tuple[torch.Tensor, int]:
    """This rank's rows and batch size: within every global batch of `batch_size` rows, every W-th.

    Global batch k of a single process is order[k*b:(k+1)*b]; rank r takes its positions r, r+W,
    ..., so at step k the W ranks together see exactly that global batch. A last, smaller batch
    is split the same way; when it has fewer rows than processes it is dropped, because a rank
    with no batch would leave the others waiting in the gradient all-reduce.
    """
    world, rank = dist.world_size, dist.rank
    full = order.numel() // batch_size
    head = order[: full * batch_size].view(full, batch_size)[:, rank::world].reshape(-1)  # (full*b/W,)
    tail = order[full * batch_size :]
    tail = tail[rank::world] if tail.numel() >= world else tail[:0]
    return torch.cat([head, tail]), batch_size // world


def _evaluate_and_schedule(model: CTRModel, valid_split: SplitTensors, device: torch.device, cfg: Config,
                           state: LoopState, optimizer: torch.optim.Optimizer, run_dir: Path,
                           dist: distributed.Context, vocab, features: FeatureSet, train_loss: float,
                           samples_per_second: float) -> dict[str, Any]:
    """Evaluate; save best or decay the LR; decide early stopping (FuxiCTR checkpoint_and_earlystop)."""
    train_cfg = cfg.train
    metrics = evaluate(model, valid_split, device, train_cfg, dist)
    if not math.isfinite(metrics["auc"]):
        raise QinError(f"validation AUC is undefined at step {state.global_step} (epoch {state.epoch + 1}): "
                       "the validation split has a single class or the model predicts NaN; stopped")
    lr_used = optimizer.param_groups[0]["lr"]
    improved = metrics["auc"] >= state.best_auc + train_cfg.min_delta
    if improved:
        state.best_auc, state.best_epoch, state.best_step = metrics["auc"], state.epoch + 1, state.global_step
        state.bad_evaluations = 0
        if dist.is_main:
            save_checkpoint(run_dir / "best.pt", {
                "config": cfg.to_dict(), "vocab": dataclasses.asdict(vocab),
                "model_state": model.state_dict(),
                "epoch": state.epoch + 1, "step": state.global_step, "valid_auc": metrics["auc"],
                "valid_logloss": metrics["logloss"], "feature_dir": str(features.dir.resolve()),
                "mm_dim": int(features.item_emb.shape[1]), "feature_sources": features_fingerprint(features),
                "git_commit": git_commit(),
            })
    else:
        state.bad_evaluations += 1
        for group in optimizer.param_groups:
            group["lr"] = max(group["lr"] * train_cfg.lr_decay_factor, train_cfg.min_lr)
        if state.bad_evaluations >= train_cfg.patience:
            state.stopped_early = True
            state.finished = True
    return {"epoch": state.epoch + 1, "step": state.global_step, "lr": lr_used, "train_loss": train_loss,
            "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"], "improved": improved,
            "best_auc": state.best_auc, "samples_per_second": samples_per_second}


def _save_last(run_dir: Path, model: CTRModel, optimizer: torch.optim.Optimizer, cfg: Config,
               state: LoopState, dist: distributed.Context, features: FeatureSet) -> None:
    if not dist.is_main:
        return
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    save_checkpoint(run_dir / "last.pt", {
        "config": cfg.to_dict(), "vocab": dataclasses.asdict(vocab_of(features)),
        "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
        "loop_state": dataclasses.asdict(state), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        # Plain values and tensors only, so the file loads with weights_only=True.
        "numpy_rng": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
        "python_rng": random.getstate(),
        "feature_dir": str(features.dir.resolve()), "feature_sources": features_fingerprint(features),
        "mm_dim": int(features.item_emb.shape[1]),
    })


def features_fingerprint(features: FeatureSet) -> dict[str, str]:
    """{input file name: sha256} of the raw files the feature folder was built from."""
    return {name: entry.get("sha256", "") for name, entry in features.manifest.get("sources", {}).items()}


def _restore(path: Path, model: CTRModel, optimizer: torch.optim.Optimizer, cfg: Config,
             features: FeatureSet) -> LoopState:
    if not path.is_file():
        raise QinError(f"cannot resume: {path} not found. The run stopped before its first training state "
                       "was saved (at the first evaluation or epoch end); start it again with --overwrite")
    saved = load_checkpoint(path)
    if comparable(saved["config"]) != comparable(cfg.to_dict()):
        difference = _config_difference(comparable(saved["config"]), comparable(cfg.to_dict()))
        raise QinError(f"cannot resume {path.parent}: the config differs from the one it was started with in "
                       f"{difference} (see {path.parent / 'config.yaml'})")
    recorded = saved.get("feature_sources")
    if recorded is not None and recorded != features_fingerprint(features):
        changed = sorted(name for name in set(recorded) | set(features_fingerprint(features))
                         if recorded.get(name) != features_fingerprint(features).get(name))
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


def _config_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The first differing keys, as 'train.epochs (3 -> 5)'."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                changes.append(f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return ", ".join(changes[:3]) + (", ..." if len(changes) > 3 else "") if changes else "its layout"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop evaluations logged after last.pt was saved (a resumed run logs them again) and a torn line."""
    if not path.is_file():
        return
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= last_step]
    atomic_write_text(path, "".join(json.dumps(record, default=str) + "\n" for record in kept))


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


def _summary(result: FitResult, cfg: Config, features: FeatureSet) -> dict[str, Any]:
    return {
        "run_dir": str(result.run_dir), "model": cfg.model.name.value, "valid_auc": result.valid_auc,
        "valid_logloss": result.valid_logloss, "best_epoch": result.best_epoch, "best_step": result.best_step,
        "steps": result.steps, "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 2), "feature_dir": str(features.dir),
        "config": cfg.to_dict(), "git_commit": git_commit(),
    }
