"""Does the ASTA -> QNN-alpha stack train at embedding 128? `configs/qnn_alpha.yaml` beside `qin.yaml`.

Both train on the suite's `synth` data set at `bench` size (500k train rows) with the reference widths
(embedding 128, D = 1024) and batch 8192, for a fixed number of steps on CPU, evaluating every
`--eval-steps` steps. Recorded per evaluation: the running mean train loss of the epoch and valid AUC.
The QNN-alpha stack diverged at full size before its tower's input was normalised (train loss 5.7e6 at
epoch 1); the pass criteria are train loss < 1 at every evaluation and a valid AUC within 0.01 of QIN's.

    python benchmarks/qnn_alpha_bench.py [--steps 60] [--eval-steps 10] [--threads 2]

Writes benchmarks/results/qnn_alpha_bench.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import machine, now, write_json
from rich.console import Console
from suite import SUITE, WORK, draw

from qin.config import Config
from qin.features.folder import feature_dir_for
from qin.features.io import load_features
from qin.features.pipeline import build_features
from qin.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "qnn_alpha_bench.json"
CONFIGS = {"qin": ROOT / "qin.yaml", "qnn_alpha": ROOT / "configs" / "qnn_alpha.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-steps", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    console = Console()
    dataset = next(d for d in SUITE if d.name == "synth")
    raw_dir = draw(dataset, "bench", console) / "MicroLens_1M_x1"
    record = json.loads(RESULT.read_text()) if RESULT.is_file() else {"runs": {}}
    for name in args.models:
        cfg = Config.from_yaml(CONFIGS[name], [
            f"data.raw_dir={raw_dir}", f"data.features_root={WORK / 'features'}",
            f"data.max_len={args.max_len}", f"train.run_root={WORK / 'runs'}",
            f"train.max_steps={args.steps}", f"train.eval_steps={args.eval_steps}",
            f"train.threads={args.threads}", "train.epochs=1",
            f"train.patience={args.steps}"])
        feature_dir = feature_dir_for(Path(cfg.data.features_root), raw_dir, cfg.data.max_len, None)
        built = build_features(raw_dir, feature_dir, cfg.data.max_len, progress=False)
        started = time.perf_counter()
        result = fit(cfg, load_features(built.feature_dir), WORK / "runs" / f"qnn-alpha-bench-{name}",
                     console=console, progress=False)
        record["runs"][name] = {
            "config": str(CONFIGS[name].relative_to(ROOT)),
            "seconds": round(time.perf_counter() - started, 1),
            "evaluations": [{"step": e["step"], "train_loss": e["train_loss"], "valid_auc": e["valid_auc"]}
                            for e in result.evaluations],
            "max_train_loss": max(e["train_loss"] for e in result.evaluations),
            "best_valid_auc": result.best_auc,
        }
        record.update({"when": now(), "machine": machine(), "steps": args.steps,
                       "batch_size": cfg.train.batch_size, "embedding_dim": cfg.model.embedding_dim,
                       "max_len": args.max_len})
        write_json(RESULT, record)
        console.log(f"{name}: max train loss {record['runs'][name]['max_train_loss']:.4f}, "
                    f"best valid AUC {result.best_auc:.4f}")


if __name__ == "__main__":
    main()
