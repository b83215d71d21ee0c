"""One measurement, run in its own process by benchmarks/run.py (so its peak memory is its own).

    python benchmarks/measure.py synth       --size bench --json OUT.json
    python benchmarks/measure.py train_speed --batch-size 8192 --steps 2 --json OUT.json
    python benchmarks/measure.py zoo_speed   --batch-size 1024 --steps 2 --json OUT.json
    python benchmarks/measure.py predict     --features DIR --json OUT.json
    python benchmarks/measure.py latency     --features DIR --json OUT.json
    python benchmarks/measure.py tune        --data DIR --json OUT.json
    python benchmarks/measure.py fit         --features DIR --config qin.yaml --set train.max_steps=4 \
        --json OUT.json

Every subcommand writes one JSON object to --json. The reference model is `qin.yaml` (QIN_variety_v9,
embedding 128, batch 8192); with a feature folder its vocabularies come from the data (31,244,293
parameters only at the challenge's sizes, i.e. on `full`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ROOT, WORK, machine, write_json  # noqa: E402

from qin.config import Config, DeviceChoice  # noqa: E402
from qin.data import SplitTensors, item_tables_of, vocab_of  # noqa: E402
from qin.features.io import FeatureSet, load_features  # noqa: E402
from qin.model import CTRModel, build_model  # noqa: E402
from qin.runtime import predict_probabilities, resolve_device, seed_everything  # noqa: E402

REFERENCE = ROOT / "qin.yaml"


def _reference_model(features: FeatureSet, config: Path, overrides: list[str], device: torch.device
                     ) -> tuple[Config, CTRModel]:
    cfg = Config.from_yaml(config, overrides)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, vocab_of(features), item_tables_of(features)).to(device).eval()
    return cfg, model


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cmd_synth(args: argparse.Namespace) -> dict[str, Any]:
    from qin.synth import SIZES, SynthSize, synthesize

    out = Path(args.out)
    started = time.perf_counter()
    result = synthesize(out, SynthSize(args.size), seed=args.seed, images=False, progress=False)
    spec = SIZES[SynthSize(args.size)]
    return {"size": args.size, "out": str(out), "seconds": round(time.perf_counter() - started, 2),
            "rows": {"train": spec.train_rows, "valid": spec.valid_rows, "test": spec.test_rows},
            "n_items": spec.n_items, "seq_len": spec.seq_len,
            "oracle_valid_auc": result.meta.get("auc", {}).get("oracle_valid"),
            "disk_mib": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20)}


def cmd_train_speed(args: argparse.Namespace) -> dict[str, Any]:
    """benchmarks/train_speed.py's measurement (challenge-shaped batches, challenge vocabularies)."""
    import train_speed as ts

    cfg = Config.from_yaml(args.config, [f"train.batch_size={args.batch_size}", *args.overrides])
    device = resolve_device(DeviceChoice(args.device))
    rng = np.random.default_rng(0)
    tables = ts.item_tables(rng)
    batches = [ts.challenge_like_batch(args.batch_size, cfg.data.max_len, rng)
               for _ in range(args.steps + args.warmup)]
    results = {}
    for path in args.paths:
        if path == "fast_without_l2":
            no_reg = Config.from_dict({**cfg.to_dict(),
                                       "train": {**cfg.to_dict()["train"], "embedding_regularizer": 0.0}})
            results[path] = ts.time_path(no_reg, True, batches, tables, device, args.warmup)
        else:
            results[path] = ts.time_path(cfg, path == "fast", batches, tables, device, args.warmup)
        print(path, results[path], file=sys.stderr, flush=True)
    record: dict[str, Any] = {
        "config": str(Path(args.config).resolve().relative_to(ROOT)) if Path(args.config).resolve()
        .is_relative_to(ROOT) else args.config, "overrides": args.overrides, "model": cfg.model.name.value,
        "device": device.type, "batch_size": args.batch_size, "steps_timed": args.steps,
        "warmup_steps": args.warmup,
        "mean_history_items": float(np.mean([(b.history != 0).sum(1).float().mean() for b in batches])),
        "results": results, "samples_per_second": results[args.paths[0]]["samples_per_second"],
        "seconds_per_step": results[args.paths[0]]["seconds_per_step"],
        "parameters": results[args.paths[0]]["parameters"],
        "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }
    if "fast" in results and "per_slot" in results:
        record["speedup_fast_vs_per_slot"] = (results["fast"]["samples_per_second"]
                                              / results["per_slot"]["samples_per_second"])
    if "fast" in results and "fast_without_l2" in results:
        record["l2_share_of_fast_step"] = 1 - (results["fast_without_l2"]["seconds_per_step"]
                                               / results["fast"]["seconds_per_step"])
    return record


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Rows/s of scoring whole splits at the eval batch size (65536), as `qin predict` does."""
    features = load_features(Path(args.features))
    device = resolve_device(DeviceChoice(args.device))
    cfg, model = _reference_model(features, Path(args.config), args.overrides, device)
    batch_size = args.batch_size or cfg.train.eval_batch_size
    splits = {name: SplitTensors.from_arrays(features.split(name)) for name in args.splits}
    warm = next(iter(splits.values()))
    predict_probabilities(model, warm.take(torch.arange(min(1024, warm.rows))), batch_size, device, cfg.train)
    per_split = {}
    for name, split in splits.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            probabilities = predict_probabilities(model, split, batch_size, device, cfg.train)
            times.append(time.perf_counter() - started)
        assert probabilities.shape == (split.rows,)
        best = min(times)
        per_split[name] = {"rows": split.rows, "seconds": [round(t, 3) for t in times],
                           "rows_per_second": round(split.rows / float(np.median(times))),
                           "rows_per_second_best": round(split.rows / best)}
    rows = sum(s["rows"] for s in per_split.values())
    seconds = sum(float(np.median(s["seconds"])) for s in per_split.values())
    return {"features": str(features.dir), "device": device.type, "batch_size": batch_size,
            "parameters": _parameters(model), "vocab": vars(vocab_of(features)), "splits": per_split,
            "rows": rows, "rows_per_second": round(rows / seconds), "repeats": args.repeats,
            "weights": "freshly initialised (speed does not depend on the values)"}


def cmd_latency(args: argparse.Namespace) -> dict[str, Any]:
    """One request = 1 user's history x C candidate items, through qin.predict.one_request.

    p50/p99 are one_request's (qin.serve's fast path for the QIN family; `path` says which ran; the first
    request, which builds its tables, is a warm-up). The plain path (the history repeated C times through
    the whole model) is timed on the same requests after it, and both paths' scores are compared.
    `cores_used` = process CPU time / wall time over the timed requests.
    """
    import copy
    from collections.abc import Callable

    from qin import serve
    from qin.predict import LoadedRun, one_request

    features = load_features(Path(args.features))
    device = resolve_device(DeviceChoice(args.device))
    cfg, model = _reference_model(features, Path(args.config), args.overrides, device)
    run = LoadedRun(run_dir=WORK, config=cfg, model=model, features=features, device=device, checkpoint={})
    users = features.split("valid")
    pool = features.split("test")
    rng = np.random.default_rng(0)
    n_requests = args.warmup + args.requests
    requests = []
    for _ in range(n_requests):
        row = int(rng.integers(users.item_id.shape[0]))
        rows = rng.integers(pool.item_id.shape[0], size=args.candidates)
        requests.append((np.asarray(users.history[row], dtype=np.int64),
                         np.asarray(pool.item_id[rows], dtype=np.int64),
                         np.asarray(pool.likes_level[rows], dtype=np.int64),
                         np.asarray(pool.views_level[rows], dtype=np.int64)))

    def timed(score: Callable[..., np.ndarray]) -> tuple[list[float], list[np.ndarray], dict[str, float]]:
        times, outputs = [], []
        cpu_started = wall_started = 0.0
        for index, request in enumerate(requests):
            if index == args.warmup:
                cpu_started, wall_started = time.process_time(), time.perf_counter()
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            scores = score(*request)  # returns numpy: waits for the device
            elapsed = time.perf_counter() - started
            assert scores.shape == (args.candidates,)
            times.append(elapsed * 1000)
            outputs.append(scores)
        cpu, wall = time.process_time() - cpu_started, time.perf_counter() - wall_started
        return times, outputs, {"cores_used": round(cpu / wall, 2),
                                "cpu_ms_per_request": round(cpu * 1000 / args.requests, 3)}

    def percentiles(times: list[float]) -> dict[str, float]:
        ms = np.asarray(times[args.warmup:])
        return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
                "p90_ms": round(float(np.percentile(ms, 90)), 3),
                "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3),
                "max_ms": round(float(ms.max()), 3)}

    times, scores, cores = timed(lambda *request: one_request(run, *request))
    path = "fast" if serve.server_for(model) is not None else "plain"
    plain_times, plain_scores, plain_cores = timed(
        lambda *request: serve.plain_request(model, device, *request))
    difference = max(float(np.abs(fast.astype(np.float64) - plain).max())
                     for fast, plain in zip(scores, plain_scores, strict=True))
    # The yardstick for that difference: how far float32 rounding alone moves each path from a float64 copy
    # of the model (warm-up requests). Freshly initialised, the reference tower's activations reach ~1e4
    # and amplify rounding: the paths then differ by more than on a trained model, and neither is exact.
    exact = copy.deepcopy(model).double()
    truth = [serve.plain_request(exact, device, *request) for request in requests[:args.warmup]]
    float32_error = {name: max((float(np.abs(out.astype(np.float64) - true).max())
                                for out, true in zip(outputs[:args.warmup], truth, strict=True)), default=0.0)
                     for name, outputs in (("fast", scores), ("plain", plain_scores))}
    history_items = float(np.mean([(r[0] != 0).sum() for r in requests]))
    return {"features": str(features.dir), "device": device.type, "candidates": args.candidates,
            "history_slots": int(requests[0][0].shape[0]), "mean_history_items": history_items,
            "warmup_requests": args.warmup, "timed_requests": args.requests, "parameters": _parameters(model),
            "overrides": args.overrides, "cpu_bf16": cfg.train.cpu_bf16,
            "path": path, **percentiles(times), **cores, "first_request_ms": round(times[0], 1),
            "plain": {**percentiles(plain_times), **plain_cores},
            "max_abs_difference_vs_plain": difference, "max_abs_error_vs_float64": float32_error,
            "torch_threads": torch.get_num_threads()}


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    """`qin embed --tune histories` (default settings, seed 0) on a generated data set: the data's own
    item_info as the content table, its train.parquet's histories. The tuned table goes to a temporary
    folder and is deleted; the record has the tuner's own timing next to the process's (run.py's)."""
    import tempfile

    from qin.embed.tune import TuneSettings, tune_on_histories

    raw = Path(args.data) / "MicroLens_1M_x1"
    settings = TuneSettings(steps=args.steps, seed=0)
    with tempfile.TemporaryDirectory(prefix="qin-tune-") as tmp:
        out = Path(tmp) / "tuned.parquet"
        result = tune_on_histories(raw / "item_info.parquet", raw / "train.parquet", out, settings,
                                   progress=False)
    return {"data": str(args.data), "items": result.items, "warm_items": result.warm_items,
            "histories": result.histories, "steps": settings.steps, "batch_size": settings.batch_size,
            "final_loss": result.final_loss, "seconds": round(result.seconds, 1),
            "torch_threads": torch.get_num_threads()}


def cmd_fit(args: argparse.Namespace) -> dict[str, Any]:
    """`qin train` (qin.train.fit) on a feature folder, with per-step timestamps."""
    from rich.console import Console

    from qin.train import fit

    features = load_features(Path(args.features))
    overrides = [f"train.run_root={WORK / 'runs'}", *args.overrides]
    cfg = Config.from_yaml(args.config, overrides)
    run_dir = Path(args.run_dir) if args.run_dir else WORK / "runs" / f"bench-{cfg.model.name.value}"
    stamps: list[float] = []
    started = time.perf_counter()
    result = fit(cfg, features, run_dir, progress=False, console=Console(stderr=True),
                 on_step=lambda step: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - started
    train_rows = int(features.split("train").item_id.shape[0])
    batch = cfg.train.batch_size
    steps_per_epoch = -(-train_rows // batch)
    step_seconds = np.diff(np.asarray(stamps)) if len(stamps) > 1 else np.asarray([result.train_seconds])
    # Rows trained: whole epochs plus the partial one (all batches full but an epoch's last).
    full_epochs, rest = divmod(result.steps, steps_per_epoch)
    rows = full_epochs * train_rows + rest * batch
    evals = result.evaluations
    model = build_model(cfg.model, vocab_of(features), item_tables_of(features))
    record = {
        "features": str(features.dir), "model": cfg.model.name.value, "config": args.config,
        "overrides": args.overrides, "parameters": _parameters(model), "batch_size": batch,
        "train_rows": train_rows, "steps_per_epoch": steps_per_epoch, "steps": result.steps,
        "rows_trained": rows, "epochs_run": result.epochs_run,
        "train_seconds": round(result.train_seconds, 2),
        "samples_per_second": round(rows / result.train_seconds, 1),
        "step_seconds": [round(float(s), 3) for s in step_seconds],
        "median_step_seconds_after_first": round(float(np.median(step_seconds)), 3),
        "fit_wall_seconds": round(wall, 2), "valid_auc": result.valid_auc,
        "valid_logloss": result.valid_logloss,
        "best_epoch": result.best_epoch, "evaluations": evals, "run_dir": str(run_dir),
        "threads": torch.get_num_threads(),
    }
    # Steady-state step time (the first step pays allocations, so it is left out when there are more).
    per_step = float(np.median(step_seconds))
    record["extrapolated_epoch_seconds"] = round(per_step * steps_per_epoch, 1)
    record["extrapolated_epoch_samples_per_second"] = round(train_rows / (per_step * steps_per_epoch), 1)
    return record


ZOO_CONFIGS = {"qin": REFERENCE, "qin_plus": ROOT / "configs" / "qin_plus.yaml",
               "din": ROOT / "configs" / "din.yaml", "dcnv2": ROOT / "configs" / "dcnv2.yaml",
               "dlf": ROOT / "configs" / "dlf.yaml", "din_sa": ROOT / "configs" / "din_sa.yaml",
               "transformer_dcn": ROOT / "configs" / "transformer_dcn.yaml",
               "transformer_dcn_lowrank": ROOT / "configs" / "transformer_dcn_lowrank.yaml"}


def cmd_zoo_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Every model of the zoo at its own config (challenge vocabularies, challenge-shaped batches, one batch
    size for all): training samples/s on the fast path and scoring rows/s (eval mode, no gradient)."""
    import train_speed as ts

    from qin.runtime import autocast_context

    device = resolve_device(DeviceChoice(args.device))
    rng = np.random.default_rng(0)
    tables = ts.item_tables(rng)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        cfg = Config.from_yaml(ZOO_CONFIGS[name], [f"train.batch_size={args.batch_size}",
                                                    "data.max_len=64"])
        batches = [ts.challenge_like_batch(args.batch_size, cfg.data.max_len, rng)
                   for _ in range(args.steps + args.warmup)]
        train = ts.time_path(cfg, True, batches, tables, device, args.warmup)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, ts.VOCAB, tables).to(device).eval()
        times = []
        with torch.no_grad(), autocast_context(device, cfg.train):
            for index, batch in enumerate(batches):
                batch = batch.to(device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model(batch).float().cpu()
                if index >= args.warmup:
                    times.append(time.perf_counter() - started)
        row = {"model": name, "config": str(ZOO_CONFIGS[name].relative_to(ROOT)), **train,
               "scoring_rows_per_second": args.batch_size / float(np.mean(times))}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
        del model
    return {"device": device.type, "batch_size": args.batch_size, "steps_timed": args.steps,
            "warmup_steps": args.warmup, "rows": rows,
            "peak_cuda_mib": (round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda"
                              else None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--json", required=True, type=Path)
        p.add_argument("--device", default="auto", choices=[c.value for c in DeviceChoice])
        p.add_argument("--config", default=str(REFERENCE))
        p.add_argument("--set", dest="overrides", action="append", default=[])
        p.add_argument("--threads", type=int, default=None)
        return p

    p = add("synth")
    p.add_argument("--size", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = add("train_speed")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--paths", nargs="+", default=["fast", "per_slot"],
                   choices=["fast", "per_slot", "fast_without_l2"])
    p = add("zoo_speed")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--models", nargs="+", default=list(ZOO_CONFIGS), choices=list(ZOO_CONFIGS))
    p = add("predict")
    p.add_argument("--features", required=True)
    p.add_argument("--splits", nargs="+", default=["valid", "test"])
    p.add_argument("--batch-size", type=int, default=None, help="default: train.eval_batch_size (65536)")
    p.add_argument("--repeats", type=int, default=3)
    p = add("latency")
    p.add_argument("--features", required=True)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--requests", type=int, default=300)
    p = add("tune")
    p.add_argument("--data", required=True, help="a generated data set's root (holds MicroLens_1M_x1/)")
    p.add_argument("--steps", type=int, default=2000)
    p = add("fit")
    p.add_argument("--features", required=True)
    p.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    handler = {"synth": cmd_synth, "train_speed": cmd_train_speed, "zoo_speed": cmd_zoo_speed,
               "predict": cmd_predict,
               "latency": cmd_latency, "tune": cmd_tune, "fit": cmd_fit}[args.command]
    started = time.perf_counter()
    record = {"measurement": args.command, **handler(args)}
    record["seconds_in_process"] = round(time.perf_counter() - started, 2)
    record["machine"] = machine()
    write_json(args.json, record)
    print(json.dumps({k: v for k, v in record.items() if k not in ("evaluations", "machine")}, default=str),
          file=sys.stderr)


if __name__ == "__main__":
    main()
