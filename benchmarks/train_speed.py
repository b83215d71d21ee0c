"""Training throughput of the reference QIN: unique-item fast path vs. the per-slot path.

Same run, same weights, same batches: the reference configuration (qin.yaml, 31,244,293
parameters with the challenge's vocabularies), batch 8192, histories of the challenge's shape
(64 slots, ~9 real items on average, item popularity Zipf-like). Reports samples/s per path,
the step time share of the full-table L2 regulariser, and peak memory. Writes
benchmarks/results/train_speed_<device>.json.

Per path also the model FLOPs per sample, counted (qin/flops.py: torch's FlopCounterMode, matmul-like
operators only) on the first batch, and from them the achieved TFLOP/s and the model FLOPs utilisation
(MFU) against the device's matmul peak MEASURED here in the step's dtype (bf16 on CUDA with train.bf16 or
on CPU with train.cpu_bf16, float32 otherwise), not the datasheet's. The fast path's FLOPs depend on the
batch's distinct items.

    python benchmarks/train_speed.py [--steps 5] [--batch-size 8192] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from qin.batch import Batch, ItemTables, Vocab
from qin.config import Config, DeviceChoice, TrainConfig
from qin.flops import default_peak_size, measured_peak_flops, train_flops_per_sample
from qin.model import build_model
from qin.runtime import resolve_device, seed_everything
from qin.train import make_optimizer, make_train_step

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = Vocab(items=91718, tags=11740, levels=11)


def challenge_like_batch(rows: int, max_len: int, rng: np.random.Generator) -> Batch:
    """A batch shaped like MicroLens: Zipf item popularity, ~9 history items of 64 slots."""
    popularity = 1.0 / np.arange(1, VOCAB.items) ** 1.05
    popularity /= popularity.sum()
    lengths = np.clip(1 + rng.negative_binomial(1.5, 1.5 / (1.5 + 8.0), size=rows), 1, max_len)
    history = np.zeros((rows, max_len), dtype=np.int64)
    items = rng.choice(np.arange(1, VOCAB.items), size=(rows, max_len), p=popularity)
    slots = np.arange(max_len)[None, :] >= (max_len - lengths[:, None])  # left padding
    history[slots] = items[slots]
    return Batch(
        target_item=torch.from_numpy(rng.choice(np.arange(1, VOCAB.items), size=rows, p=popularity)),
        history=torch.from_numpy(history),
        likes_level=torch.from_numpy(rng.integers(1, 11, size=rows)),
        views_level=torch.from_numpy(rng.integers(1, 11, size=rows)),
        label=torch.from_numpy((rng.random(rows) < 0.25).astype(np.float32)),
    )


def item_tables(rng: np.random.Generator) -> ItemTables:
    tags = rng.integers(1, VOCAB.tags - 1, size=(VOCAB.items, 5))
    tags[rng.random((VOCAB.items, 5)) < 0.4] = 0
    tags[0] = 0
    mm = rng.standard_normal((VOCAB.items, 128)).astype(np.float32)
    mm[0] = 0
    return ItemTables(tags=torch.from_numpy(tags), mm_emb=torch.from_numpy(mm))


def step_dtype(device: torch.device, train_cfg: TrainConfig) -> torch.dtype:
    """The dtype the step's matmuls run in: bf16 under the step's autocast (CUDA with train.bf16, CPU with
    train.cpu_bf16), float32 otherwise."""
    autocast = train_cfg.bf16 if device.type == "cuda" else train_cfg.cpu_bf16
    return torch.bfloat16 if autocast else torch.float32


@functools.cache
def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul FLOP/s of the device in `dtype` (qin.flops.measured_peak_flops), once per process."""
    return measured_peak_flops(device, dtype)


def time_path(cfg: Config, unique_items: bool, batches: list[Batch], tables: ItemTables, device: torch.device,
              warmup: int, count_flops: bool = True) -> dict:
    """Samples/s of the training step on `batches` (the first `warmup` untimed) and, with `count_flops`,
    the FLOPs per sample counted on the first batch, the achieved TFLOP/s and the MFU."""
    seed_everything(cfg.train.seed)
    model_cfg = Config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                             "unique_items": unique_items}}).model
    model = build_model(model_cfg, VOCAB, tables).to(device)
    # Counted before the first step, on a copy of the model under a forked RNG: the timed run is unchanged.
    flops = train_flops_per_sample(model, batches[0], cfg.train) if count_flops else None
    optimizer = make_optimizer(model, cfg.train)
    step = make_train_step(model, model, optimizer, cfg, device)
    times = []
    for index, batch in enumerate(batches):
        batch = batch.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        float(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    rows = batches[0].size
    result = {"unique_items": unique_items, "steps_timed": len(times),
              "seconds_per_step": float(np.mean(times)),
              "samples_per_second": rows / float(np.mean(times)),
              "parameters": sum(p.numel() for p in model.parameters())}
    if flops is not None:
        dtype = step_dtype(device, cfg.train)
        peak = matmul_peak(device, dtype)
        achieved = flops.train * result["samples_per_second"]  # model FLOP/s of the timed steps
        result.update({
            "train_flops_per_sample": flops.train,  # forward + backward, loss included, optimizer not
            "forward_flops_per_sample": flops.forward,
            "inference_flops_per_sample": flops.inference,
            "flops_counted_on": flops.as_dict(),
            "achieved_tflops": achieved / 1e12,
            "peak_tflops_measured": peak / 1e12,
            "peak_dtype": str(dtype).removeprefix("torch."),
            "peak_matmul_size": default_peak_size(device),
            "mfu": achieved / peak,
        })
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "qin.yaml"))
    args = parser.parse_args()
    cfg = Config.from_yaml(args.config, [f"train.batch_size={args.batch_size}"])
    device = resolve_device(DeviceChoice(args.device))
    rng = np.random.default_rng(0)
    tables = item_tables(rng)
    batches = [challenge_like_batch(args.batch_size, cfg.data.max_len, rng)
               for _ in range(args.steps + args.warmup)]
    real = float(np.mean([(b.history != 0).sum(1).float().mean() for b in batches]))
    results = {"fast": time_path(cfg, True, batches, tables, device, args.warmup),
               "per_slot": time_path(cfg, False, batches, tables, device, args.warmup)}
    no_reg = Config.from_dict({**cfg.to_dict(),
                               "train": {**cfg.to_dict()["train"], "embedding_regularizer": 0.0}})
    results["fast_without_l2"] = time_path(no_reg, True, batches, tables, device, args.warmup)
    record = {
        "benchmark": "train_speed", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "mean_history_items": real, "results": results,
        "speedup_fast_vs_per_slot": results["fast"]["samples_per_second"]
        / results["per_slot"]["samples_per_second"],
        "l2_share_of_fast_step": 1 - results["fast_without_l2"]["seconds_per_step"]
        / results["fast"]["seconds_per_step"],
        "matmul_peak_tflops": results["fast"]["peak_tflops_measured"],
        "matmul_peak_dtype": results["fast"]["peak_dtype"],
        "mfu": {path: result["mfu"] for path, result in results.items()},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"train_speed_{device.type}.json"
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    print(f"| {record['device_name']} ({device.type}, {record['cpu_threads']} threads) | "
          f"{results['fast']['samples_per_second']:,.0f} | "
          f"{results['per_slot']['samples_per_second']:,.0f} | "
          f"{record['speedup_fast_vs_per_slot']:.2f}x | {record['peak_rss_mib']:,.0f} MiB |")
    for path, result in results.items():
        counted_on = result["flops_counted_on"]
        print(f"{path}: {result['forward_flops_per_sample'] / 1e6:,.1f} MFLOP/sample forward, "
              f"{result['train_flops_per_sample'] / 1e6:,.1f} train (counted at batch "
              f"{counted_on['batch_size']}, {counted_on['unique_item_ids']:,} distinct items); "
              f"{result['achieved_tflops']:.3f} TFLOP/s achieved, MFU "
              f"{100 * result['mfu']:.1f}% of the measured {result['peak_dtype']} matmul peak "
              f"{result['peak_tflops_measured']:.3f} TFLOP/s")


if __name__ == "__main__":
    main()
