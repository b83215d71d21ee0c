"""Quality table: validation AUC of QIN, DIN, each ablation and QNN-alpha against the oracle.

Trains every model on the same generated data set with the same budget (the demo config,
`configs/demo.yaml`, with only `model.name` changed), scores the validation split and puts the
generator's oracle AUC of the same rows beside it. Writes benchmarks/results/quality_<size>.json
and prints a markdown table for the README.

    python benchmarks/quality.py [--size small] [--models qin din ...] [--set train.epochs=8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from qin.config import Config, ModelName
from qin.features.io import load_features
from qin.features.pipeline import build_features, feature_dir_for
from qin.predict import evaluate_run, load_run
from qin.synth import SynthSize, synthesize
from qin.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--models", nargs="*", default=[m.value for m in ModelName])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--tag", default="", help="suffix of the results file and run folders")
    args = parser.parse_args()
    console = Console()
    work = Path(args.work)
    data_root = work / f"data-{args.size}"
    if not (data_root / "hidden" / "meta.json").is_file():
        synthesize(data_root, SynthSize(args.size), seed=0)
    meta = json.loads((data_root / "hidden" / "meta.json").read_text())
    base = Config.from_yaml(args.config, [f"data.raw_dir={data_root / 'MicroLens_1M_x1'}",
                                          f"data.features_root={work / 'features'}",
                                          f"train.run_root={work / 'runs'}", *args.overrides])
    raw_dir = Path(base.data.raw_dir)
    built = build_features(raw_dir, feature_dir_for(Path(base.data.features_root), raw_dir, base.data.max_len, None),
                           base.data.max_len)
    features = load_features(built.feature_dir)
    rows = []
    for name in args.models:
        cfg = base.replace("model", name=name)
        run_dir = work / "runs" / f"quality-{args.size}{args.tag}-{name}"
        started = time.perf_counter()
        fit(cfg, features, run_dir, console=console, progress=False)
        evaluation = evaluate_run(load_run(run_dir), data_root / "hidden")
        row = {"model": name, "valid_auc": evaluation["auc"], "oracle_auc": evaluation["oracle_auc"],
               "valid_logloss": evaluation["logloss"], "seconds": round(time.perf_counter() - started, 1),
               "parameters": sum(p.numel() for p in load_run(run_dir).model.parameters())}
        rows.append(row)
        console.print(row)
    record = {"benchmark": "quality", "size": args.size, "config": base.to_dict(), "rows": rows,
              "generator_auc": meta.get("auc")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quality_{args.size}{args.tag}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"mm_normalize={base.data.mm_normalize.value}, popularity alone {meta['auc']['popularity_valid']:.4f}")
    print("| model | valid AUC | oracle AUC | % of oracle | params | train+eval s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['valid_auc']:.4f} | {row['oracle_auc']:.4f} | "
              f"{100 * row['valid_auc'] / row['oracle_auc']:.1f}% | {row['parameters']:,} | {row['seconds']} |")


if __name__ == "__main__":
    main()
