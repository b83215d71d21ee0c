"""CPU training speed side by side with the published QIN code: qin's step vs. salmon1802/QIN's, same batches.

    git clone https://github.com/salmon1802/QIN benchmarks/work/QIN       # the published code, once
    python benchmarks/reference_speed.py [--batch-sizes 8192 1024] [--rounds 2] [--steps 3] [--threads 2]

1. The FuxiCTR venv of benchmarks/peer_fuxictr.py (fuxictr 2.3.7, CPU torch) is created on first use.
2. Per batch size, challenge-shaped batches (benchmarks/train_speed.py's: 64 history slots, about 9 real,
   Zipf item popularity, the challenge's vocabularies) are drawn once and written to an .npz both sides read.
3. Each round runs the published `QIN_variety_v9.train_step` in the FuxiCTR venv
   (benchmarks/peer/reference_qin_step.py), then qin's training step (`qin.train.make_train_step`, the
   reference configuration qin.yaml, unique-item fast path), each in its own process with the same thread
   count; rounds alternate so that a change of load on this shared machine hits both sides alike. Both
   sides have 31,244,293 parameters (checked) and the same math: full-table L2 on every embedding table,
   dropout 0.1, BatchNorm, Adam, clip-norm 10. Timed: forward, loss, backward, clip, optimizer step;
   data loading is excluded on both sides. The first `--warmup` steps of each process are not timed.
4. Writes benchmarks/results/reference_speed_cpu.json: per batch size the mean step time of each side over
   all rounds, `ratio_vs_reference` (qin samples/s over the reference's, at the largest batch size) and the
   ratio of every round, with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import RESULTS, WORK, log, machine, now, run_measured, write_json  # noqa: E402

PEER_SCRIPT = Path(__file__).resolve().parent / "peer" / "reference_qin_step.py"
DEFAULT_SRC = WORK / "QIN"
BATCH_FIELDS = ("history", "target_item", "likes_level", "views_level", "label")


def write_batches(path: Path, batch_size: int, count: int, max_len: int) -> None:
    """`count` challenge-shaped batches and the item tables, as arrays both sides read."""
    from train_speed import VOCAB, challenge_like_batch, item_tables

    rng = np.random.default_rng(0)
    tables = item_tables(rng)
    arrays: dict[str, np.ndarray] = {"item_tags": tables.tags.numpy(), "item_mm": tables.mm_emb.numpy(),
                                     "steps": np.array(count), "tag_vocab": np.array(VOCAB.tags)}
    for index in range(count):
        batch = challenge_like_batch(batch_size, max_len, rng)
        for field in BATCH_FIELDS:
            arrays[f"{field}_{index}"] = getattr(batch, field).numpy()
    np.savez(path, **arrays)


def time_ours(batches_path: Path, out: Path, warmup: int, overrides: list[str]) -> None:
    """qin's training step on the batches of `batches_path` (runs in its own process; see --ours)."""
    import resource

    import torch
    from train_speed import VOCAB, time_path

    from qin.batch import Batch, ItemTables
    from qin.config import Config

    data = np.load(batches_path)
    batches = [Batch(**{field: torch.from_numpy(data[f"{field}_{index}"]) for field in BATCH_FIELDS})
               for index in range(int(data["steps"]))]
    tables = ItemTables(tags=torch.from_numpy(data["item_tags"]), mm_emb=torch.from_numpy(data["item_mm"]))
    assert int(data["tag_vocab"]) == VOCAB.tags
    cfg = Config.from_yaml(Path(__file__).resolve().parent.parent / "qin.yaml",
                           [f"train.batch_size={batches[0].size}", *overrides])
    result = time_path(cfg, cfg.model.unique_items, batches, tables, torch.device("cpu"), warmup,
                       count_flops=False)
    result.update({"model": "qin (qin.yaml)", "overrides": overrides, "batch_size": batches[0].size,
                   "torch_threads": torch.get_num_threads(),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    out.write_text(json.dumps(result, indent=2))


def run_side(argv: list[str], out: Path, threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    measured = run_measured(argv, env=env)
    if measured["returncode"] != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed with exit code {measured['returncode']}")
    record = json.loads(out.read_text())
    cpu = measured.get("cpu_seconds")
    record["cores_used"] = cpu / measured["wall_seconds"] if cpu and measured.get("wall_seconds") else None
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 1024])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-src", type=Path, default=DEFAULT_SRC,
                        help="root of a checkout of https://github.com/salmon1802/QIN")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override for qin's side, KEY=VALUE (repeatable)")
    parser.add_argument("--out", type=Path, default=RESULTS / "reference_speed_cpu.json")
    parser.add_argument("--ours", type=Path, help=argparse.SUPPRESS)  # internal: time qin's side only
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours:
        import torch

        torch.set_num_threads(args.threads)
        time_ours(args.ours, args.json, args.warmup, args.overrides)
        return
    if not (args.reference_src / "src" / "QIN_variety_v9.py").is_file():
        raise SystemExit(f"{args.reference_src}: no src/QIN_variety_v9.py; clone the published code first: "
                         f"git clone https://github.com/salmon1802/QIN {args.reference_src}")
    from peer_fuxictr import ensure_venv

    peer_python = ensure_venv()
    record: dict[str, Any] = {"benchmark": "reference_speed", "date": now(), "machine": machine(),
                              "threads": args.threads, "steps_per_process": args.steps, "warmup": args.warmup,
                              "rounds": args.rounds, "overrides": args.overrides, "batch_sizes": {}}
    with tempfile.TemporaryDirectory(prefix="qin-refspeed-") as tmp:
        for batch_size in args.batch_sizes:
            batches = Path(tmp) / f"batches_{batch_size}.npz"
            write_batches(batches, batch_size, args.warmup + args.steps, max_len=64)
            rounds = []
            for round_index in range(args.rounds):
                ref_out, our_out = Path(tmp) / "reference.json", Path(tmp) / "ours.json"
                reference = run_side([str(peer_python), str(PEER_SCRIPT), "--reference-src",
                                      str(args.reference_src), "--batches", str(batches),
                                      "--json", str(ref_out), "--warmup", str(args.warmup),
                                      "--threads", str(args.threads)], ref_out, args.threads)
                ours = run_side([sys.executable, __file__, "--ours", str(batches), "--json", str(our_out),
                                 "--warmup", str(args.warmup), "--threads", str(args.threads),
                                 *[f"--set={o}" for o in args.overrides]], our_out, args.threads)
                ratio = ours["samples_per_second"] / reference["samples_per_second"]
                log(f"batch {batch_size} round {round_index + 1}: reference "
                    f"{reference['seconds_per_step']:.2f} s/step, qin {ours['seconds_per_step']:.2f} s/step, "
                    f"ratio {ratio:.2f}x")
                rounds.append({"reference": reference, "qin": ours, "ratio": ratio})
            reference_s = statistics.mean(r["reference"]["seconds_per_step"] for r in rounds)
            ours_s = statistics.mean(r["qin"]["seconds_per_step"] for r in rounds)
            record["batch_sizes"][str(batch_size)] = {
                "reference_seconds_per_step": reference_s, "qin_seconds_per_step": ours_s,
                "reference_samples_per_second": batch_size / reference_s,
                "qin_samples_per_second": batch_size / ours_s,
                "ratio": reference_s / ours_s, "round_ratios": [r["ratio"] for r in rounds],
                "parameters": {"reference": rounds[0]["reference"]["parameters"],
                               "qin": rounds[0]["qin"]["parameters"]},
                "rounds": rounds}
    largest = str(max(args.batch_sizes))
    record["ratio_vs_reference"] = record["batch_sizes"][largest]["ratio"]
    record["ratio_vs_reference_batch_size"] = int(largest)
    write_json(args.out, record)
    for size, row in record["batch_sizes"].items():
        print(f"batch {size}: reference {row['reference_samples_per_second']:,.0f} samples/s, "
              f"qin {row['qin_samples_per_second']:,.0f} samples/s, {row['ratio']:.2f}x "
              f"(rounds {', '.join(f'{r:.2f}' for r in row['round_ratios'])})")


if __name__ == "__main__":
    main()
