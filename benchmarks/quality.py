"""Quality table: validation AUC of QIN, DIN, each ablation and QNN-alpha against the oracle.

Trains every model on the same generated data set with the same budget (the common budget,
`configs/budget.yaml`, with only `model.name` changed), scores the validation split and puts the
generator's oracle AUC of the same rows beside it, with GAUC (per-user AUC; the oracle's too), normalised
entropy and calibration ratio (qin/metrics.py). Writes benchmarks/results/quality_<size>.json
and prints a markdown table for the README.

    python benchmarks/quality.py [--size small] [--models qin din ...] [--set train.epochs=8] [--true-latents]

`--suite` runs the data-regime suite instead (benchmarks/suite.py): several data sets from two
independent generators, the baseline ladder beside every model, test AUC against the oracle.

    python benchmarks/quality.py --suite [--sizes small bench] [--datasets ...] [--models ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console

from qin.config import Config, ModelName
from qin.evaluation import evaluate_run
from qin.features.folder import feature_dir_for
from qin.features.io import load_features
from qin.features.pipeline import build_features
from qin.predict import load_run
from qin.synth import DEFAULT_PARAMS, SynthSize, params_with, synthesize
from qin.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def true_latent_item_info(data_root: Path, work: Path) -> Path:
    """item_info with item_emb_d128 = [v ‖ 0] (v: the 16-d latent that drives clicks); returns its path."""
    latents = pl.read_parquet(data_root / "hidden" / "item_latent.parquet").sort("item_id")
    item_info = pl.read_parquet(data_root / "MicroLens_1M_x1" / "item_info.parquet").sort("item_id")
    v = np.stack(latents["v"].to_list()).astype(np.float64)  # (N, d_lat), items 1..N
    emb = np.zeros((item_info.height, 128))  # row 0: the padding item
    emb[latents["item_id"].to_numpy(), : v.shape[1]] = v
    out = work / f"item_info_true_latents_{data_root.name}.parquet"
    item_info.with_columns(pl.Series("item_emb_d128", emb, dtype=pl.List(pl.Float64))).write_parquet(out)
    return out


def main() -> None:
    if "--suite" in sys.argv[1:]:
        from suite import main as suite_main  # benchmarks/ is on sys.path when run as a script

        suite_main([arg for arg in sys.argv[1:] if arg != "--suite"])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--models", nargs="*", default=[m.value for m in ModelName])
    parser.add_argument("--config", default=str(ROOT / "configs" / "budget.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"))
    parser.add_argument("--tag", default="", help="suffix of the results file and run folders")
    parser.add_argument("--true-latents", action="store_true",
                        help="diagnostic: replace item_emb_d128 by the generator's true item latents v "
                             "(hidden/item_latent.parquet), to separate learning item vectors from the rest")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="diagnostic: draw the data with this generator parameter changed "
                             "(e.g. attention=relu); the data go to their own folder")
    args = parser.parse_args()
    console = Console()
    work = Path(args.work)
    params = params_with(args.param)
    current_params = json.loads(json.dumps(asdict(params)))
    data_root = work / f"data-{args.size}"
    if params != DEFAULT_PARAMS:
        digest = hashlib.sha256(json.dumps(current_params, sort_keys=True).encode()).hexdigest()[:8]
        data_root = work / f"data-{args.size}-gen{digest}"
    meta_path = data_root / "hidden" / "meta.json"
    # Regenerate when the data were drawn by other generator parameters (an older qin.synth).
    if not meta_path.is_file() or json.loads(meta_path.read_text())["params"] != current_params:
        synthesize(data_root, SynthSize(args.size), seed=0, test_label=False, images=False, progress=True,
                   params=params)
    meta = json.loads(meta_path.read_text())
    overrides = [f"data.raw_dir={data_root / 'MicroLens_1M_x1'}", f"data.features_root={work / 'features'}",
                 f"train.run_root={work / 'runs'}", *args.overrides]
    if args.true_latents:
        overrides.append(f"data.item_info={true_latent_item_info(data_root, work)}")
        args.tag = f"{args.tag}_true_latents"
    base = Config.from_yaml(args.config, overrides)
    raw_dir = Path(base.data.raw_dir)
    item_info = Path(base.data.item_info) if base.data.item_info else None
    feature_dir = feature_dir_for(Path(base.data.features_root), raw_dir, base.data.max_len, item_info)
    built = build_features(raw_dir, feature_dir, base.data.max_len, item_info=item_info)
    features = load_features(built.feature_dir)
    rows = []
    for name in args.models:
        cfg = base.replace("model", name=name)
        run_dir = work / "runs" / f"quality-{args.size}{args.tag}-{name}"
        started = time.perf_counter()
        fit(cfg, features, run_dir, console=console, progress=False)
        evaluation = evaluate_run(load_run(run_dir), data_root / "hidden")
        row = {"model": name, "valid_auc": evaluation["auc"], "oracle_auc": evaluation["oracle_auc"],
               "valid_logloss": evaluation["logloss"], "valid_gauc": evaluation["gauc"],
               "oracle_gauc": evaluation["oracle_gauc"], "valid_ne": evaluation["ne"],
               "oracle_ne": evaluation["oracle_ne"], "valid_calibration": evaluation["calibration"],
               "seconds": round(time.perf_counter() - started, 1),
               "parameters": sum(p.numel() for p in load_run(run_dir).model.parameters())}
        rows.append(row)
        console.print(row)
    record = {"benchmark": "quality", "size": args.size, "config": base.to_dict(), "rows": rows,
              "generator_auc": meta.get("auc"), "generator_overrides": args.param,
              "true_latents": args.true_latents}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"quality_{args.size}{args.tag}.json").write_text(json.dumps(record, indent=2, default=str))
    popularity = meta["auc"]["popularity_valid"]
    print(f"mm_normalize={base.data.mm_normalize.value}, popularity alone {popularity:.4f}")
    print("| model | valid AUC | oracle AUC | % of oracle | valid GAUC | oracle GAUC | NE | calibration "
          "| params | train+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        share = 100 * row["valid_auc"] / row["oracle_auc"]
        print(f"| {row['model']} | {row['valid_auc']:.4f} | {row['oracle_auc']:.4f} | {share:.1f}% | "
              f"{row['valid_gauc']:.4f} | {row['oracle_gauc']:.4f} | {row['valid_ne']:.4f} | "
              f"{row['valid_calibration']:.3f} | {row['parameters']:,} | {row['seconds']} |")


if __name__ == "__main__":
    main()
