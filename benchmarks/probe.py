"""One suite model with config overrides on one suite data set, scored as the suite scores it: a probe.

The quality suite (benchmarks/suite.py) measures every model at its own settings under one budget. When a
model trails a baseline, the question is why, and the answer is a measurement with one setting changed:
this trains the suite's config of `--model` with `--set` overrides on the suite's drawn data (the same
folders, the same features), picks the checkpoint on validation AUC and scores the TEST rows, and writes
benchmarks/results/probes/<data set>_<model>_<tag>.json. Probe results never enter the suite's tables.

    python benchmarks/probe.py --dataset logs --model transformer_dcn --set train.learning_rate=2e-3 \
        --tag lr2e-3 [--seed 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from benchlib import write_json
from rich.console import Console
from suite import MODELS, SUITE, WORK, draw, model_config, test_truth

from qin.features.folder import feature_dir_for
from qin.features.io import load_features
from qin.features.pipeline import build_features
from qin.metrics import auc, logloss
from qin.predict import load_run, score_split

RESULTS = Path(__file__).resolve().parent / "results" / "probes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=[d.name for d in SUITE])
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (repeatable)")
    parser.add_argument("--tag", required=True, help="names the result file and the run folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from qin.train import fit

    console = Console()
    dataset = next(d for d in SUITE if d.name == args.dataset)
    data_root = draw(dataset, "small", console)
    raw_dir = data_root / "MicroLens_1M_x1"
    cfg = model_config(args.model, raw_dir, args.seed, args.threads, args.overrides)
    feature_dir = feature_dir_for(Path(cfg.data.features_root), raw_dir, cfg.data.max_len, None)
    built = build_features(raw_dir, feature_dir, cfg.data.max_len, progress=False)
    features = load_features(built.feature_dir)
    labels, p_true = test_truth(data_root, np.asarray(features.split("test").ids))
    run_dir = WORK / "runs" / f"{dataset.name}-small" / f"probe-{args.model}-{args.tag}-s{args.seed}"
    started = time.perf_counter()
    result = fit(cfg, features, run_dir, console=console, progress=False)
    probabilities = score_split(load_run(run_dir), "test")
    record = {"dataset": dataset.name, "size": "small", "model": args.model, "overrides": args.overrides,
              "seed": args.seed, "valid_auc": result.valid_auc, "test_auc": auc(labels, probabilities),
              "test_logloss": logloss(labels, probabilities), "oracle_test_auc": auc(labels, p_true),
              "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
              "train_losses": [e["train_loss"] for e in result.evaluations],
              "valid_aucs": [e["valid_auc"] for e in result.evaluations],
              "seconds": round(time.perf_counter() - started, 1)}
    out = RESULTS / f"{dataset.name}_{args.model}_{args.tag}.json"
    write_json(out, record)
    console.log(f"{out}: test AUC {record['test_auc']:.4f} (oracle {record['oracle_test_auc']:.4f})")


if __name__ == "__main__":
    main()
