"""Peer side by side: FuxiCTR's DIN (the organisers' baseline) vs. our DIN and our QIN, same data and budget.

    python benchmarks/peer_fuxictr.py [--size small] [--epochs 6] [--batch-size 4096] [--max-len 32]

1. Creates benchmarks/work/fuxictr-venv (python3.11 -m venv; the CPU torch==2.13.0 wheel first, then
   fuxictr==2.3.7 — the version the challenge ran — with numpy<2 (its `fit` uses `np.Inf`),
   scikit-learn<1.5 (its metrics pass `log_loss(eps=...)`), pandas<2.3 and polars<1.0 (its
   FeatureProcessor uses `Expr.apply`)). fuxictr is never a dependency of qin.
2. Generates the data set (`qin synth`, seed 0) under benchmarks/work/data-<size> unless it is there.
3. Trains, each in its own process (its own peak memory), for the same number of epochs and batch size:
   - FuxiCTR DIN: benchmarks/peer/fuxictr_din.py in the FuxiCTR venv (FuxiCTR's layers and `BaseModel.fit`);
   - our DIN: configs/din.yaml (DIN_default) through `qin.train.fit`;
   - our QIN: qin.yaml (the reference configuration) through `qin.train.fit`.
   Settings shared by all three: `--epochs`, `--batch-size` (default 4096 as in DIN_default; the organisers'
   leaderboard row says 8192), max_len, evaluation once per epoch on the whole valid split, best
   epoch's weights reported. Our DIN also gets FuxiCTR's LR decay factor (0.1; QIN's loop uses 0.5).
4. Writes benchmarks/results/peer_fuxictr_<size>_e<epochs>.json and prints a markdown table.

Samples/s are training rows over the summed time of the optimizer steps (forward, loss, backward,
clip, Adam), data loading and evaluation excluded, for all three. The machine is shared: see the
load average and CPU seconds in the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import BENCH_DIR, RESULTS, ROOT, WORK, log, machine, now, read_json, run_measured, write_json  # noqa: E402

VENV = WORK / "fuxictr-venv"
FUXICTR_VERSION = "2.3.7"
PINS = [f"fuxictr=={FUXICTR_VERSION}", "numpy<2", "scikit-learn<1.5", "pandas<2.3", "polars<1.0"]
MODELS = ["fuxictr", "din", "qin"]
SUGGESTED_MAX_LEN = {"tiny": 16, "small": 32, "bench": 64, "full": 64}


def ensure_venv(python: str = "python3.11") -> Path:
    """The FuxiCTR virtual environment, created on first use; returns its python."""
    exe = VENV / "bin" / "python"
    probe = [str(exe), "-c", "import fuxictr.pytorch.models, numpy; assert numpy.__version__ < '2'"]
    if exe.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return exe
    log(f"creating {VENV} (torch {PINS[0]} ...)")
    subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "pip"), "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # first: the CPU wheel, never the CUDA ones
    subprocess.run([*pip, "torch==2.13.0", *PINS], check=True)
    subprocess.run(probe, check=True)
    return exe


def ensure_data(size: str) -> Path:
    root = WORK / f"data-{size}"
    if not (root / "hidden" / "meta.json").is_file():
        log(f"generating {size} data at {root}")
        from qin.synth import SynthSize, synthesize

        synthesize(root, SynthSize(size), seed=0, images=False, progress=False)
    return root


def ensure_features(raw: Path, size: str, max_len: int) -> Path:
    from qin.features import build_features

    out = WORK / "features" / f"{size}-L{max_len}"
    build_features(raw, out, max_len, progress=False)
    return out


def _measured(name: str, argv: list[str], json_path: Path, nice: int, reuse: bool) -> dict[str, Any]:
    if reuse and json_path.is_file():
        log(f"peer: {name}: reusing {json_path}")
        record = read_json(json_path)
        record.setdefault("process", {})  # unknown when an older run wrote it
        return record
    log(f"peer: {name} ...")
    json_path.unlink(missing_ok=True)
    usage = run_measured(argv, log_path=json_path.with_suffix(".log"), nice=nice)
    if usage["returncode"] != 0 or not json_path.is_file():
        tail = json_path.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"peer: {name} failed (exit {usage['returncode']}); log tail:\n{tail}")
    record = read_json(json_path)
    record["process"] = usage
    write_json(json_path, record)  # with its process usage: --reuse can pick it up
    log(f"peer: {name}: valid AUC {record['valid_auc']:.4f}, {record['samples_per_second']:,.0f} samples/s, "
        f"peak RSS {usage['peak_rss_mib']:,} MiB")
    return record


def run(size: str, epochs: int, batch_size: int, max_len: int | None, nice: int, threads: int | None,
        results: Path, models: list[str] = MODELS, reuse: bool = False, scratch: Path | None = None
        ) -> dict[str, Any] | None:
    max_len = max_len or SUGGESTED_MAX_LEN[size]
    exe = ensure_venv()
    data = ensure_data(size)
    raw = data / "MicroLens_1M_x1"
    features = ensure_features(raw, size, max_len)
    meta = json.loads((data / "hidden" / "meta.json").read_text())
    scratch = scratch or WORK / f"peer-{size}-e{epochs}"
    scratch.mkdir(parents=True, exist_ok=True)
    thread_args = ["--threads", str(threads)] if threads else []

    done: dict[str, dict[str, Any]] = {}
    if "fuxictr" in models:
        argv = [str(exe), str(BENCH_DIR / "peer" / "fuxictr_din.py"), "--raw", str(raw),
                "--work", str(scratch / "fuxictr"), "--max-len", str(max_len), "--epochs", str(epochs),
                "--batch-size", str(batch_size), "--json", str(scratch / "fuxictr_din.json"), *thread_args]
        done["fuxictr"] = _measured("FuxiCTR DIN", argv, scratch / "fuxictr_din.json", nice, reuse)
    common = [f"train.epochs={epochs}", f"train.batch_size={batch_size}", f"data.max_len={max_len}",
              f"data.raw_dir={raw}", "train.eval_steps=null"]
    for name, config, extra in (("din", ROOT / "configs" / "din.yaml", ["train.lr_decay_factor=0.1"]),
                                ("qin", ROOT / "qin.yaml", [])):
        if name not in models:
            continue
        sets = [x for item in [*common, *extra] for x in ("--set", item)]
        done[name] = _measured(f"our {name}", [sys.executable, str(BENCH_DIR / "measure.py"), "fit",
                                               "--features", str(features), "--config", str(config),
                                               "--run-dir", str(scratch / f"run-{name}"), *sets, *thread_args,
                                               "--json", str(scratch / f"our_{name}.json")],
                               scratch / f"our_{name}.json", nice, reuse)
    if set(done) != set(MODELS):
        log(f"peer: ran {sorted(done)}; the comparison needs {MODELS} (run again with --reuse to assemble)")
        return None
    fux, ours = done["fuxictr"], done

    def row(label: str, r: dict[str, Any]) -> dict[str, Any]:
        evaluations = r.get("evaluations") or []
        return {"model": label, "valid_auc": r["valid_auc"], "valid_logloss": r["valid_logloss"],
                "auc_by_epoch": [e.get("valid_auc", e.get("AUC")) for e in evaluations],
                "samples_per_second": r["samples_per_second"], "train_seconds": r["train_seconds"],
                "steps": r["steps"], "parameters": r["parameters"],
                "peak_rss_mib": r["process"].get("peak_rss_mib"),
                "cpu_seconds": r["process"].get("cpu_seconds"),
                "wall_seconds": r["process"].get("wall_seconds")}

    record = {
        "benchmark": "peer_fuxictr", "date": now(), "size": size, "epochs": epochs, "batch_size": batch_size,
        "max_len": max_len, "train_rows": fux["train_rows"], "valid_rows": fux["valid_rows"],
        "oracle_valid_auc": meta.get("auc", {}).get("oracle_valid"),
        "rows": [row(f"FuxiCTR {fux['versions']['fuxictr']} DIN (organisers' DIN_default)", fux),
                 row("qin DIN (configs/din.yaml)", ours["din"]), row("qin QIN (qin.yaml)", ours["qin"])],
        "fuxictr_versions": fux["versions"], "details": {"fuxictr_din": fux, "our_din": ours["din"],
                                                         "our_qin": ours["qin"]},
        "notes": [f"same data (synth {size}, seed 0), {epochs} epoch(s), batch {batch_size}, "
                  f"max_len {max_len} for all",
                  "samples/s = training rows / summed optimizer-step time (loading and evaluation excluded)",
                  "our DIN runs with lr_decay_factor 0.1 (FuxiCTR's default, which the organisers' DIN used)",
                  "FuxiCTR DIN feeds raw likes/views levels (0 = its padding index) as the organisers did; "
                  "qin stores level + 1"],
        "machine": machine(),
    }
    out = results / f"peer_fuxictr_{size}_e{epochs}.json"
    write_json(out, record)
    log(f"wrote {out}")
    print(table(record))
    return record


def table(record: dict[str, Any]) -> str:
    lines = [f"Peer on `{record['size']}` ({record['train_rows']:,} train rows, {record['epochs']} epoch(s), "
             f"batch {record['batch_size']}, max_len {record['max_len']}; oracle valid AUC "
             f"{record['oracle_valid_auc']:.4f})" if record.get("oracle_valid_auc") else "",
             "",
             "| model | valid AUC | AUC by epoch | train samples/s | params | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        by_epoch = ", ".join(f"{a:.4f}" for a in r["auc_by_epoch"] if a is not None)
        rss = "–" if r["peak_rss_mib"] is None else f"{r['peak_rss_mib']:,}"
        lines.append(f"| {r['model']} | {r['valid_auc']:.4f} | {by_epoch} | {r['samples_per_second']:,.0f} | "
                     f"{r['parameters']:,} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=list(SUGGESTED_MAX_LEN))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=None, help="default: the size's suggested max_len")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished results in the scratch folder instead of training again")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="default: benchmarks/work/peer-<size>-e<epochs>")
    args = parser.parse_args()
    run(args.size, args.epochs, args.batch_size, args.max_len, args.nice, args.threads, args.results,
        args.models, args.reuse, args.scratch)


if __name__ == "__main__":
    main()
