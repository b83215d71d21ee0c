"""`qin demo`: the whole job on generated data, as a newcomer's first run.

synth (skipped when the same size and seed already exist) -> preprocess -> train -> predict ->
evaluate against the generator's oracle AUC on the same validation rows.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from qin.config import Config
from qin.errors import QinError


def run_demo(size: str, cfg: Config, submission: Path, console: Console, seed: int = 0) -> dict[str, Any]:
    from qin.evaluation import evaluate_run
    from qin.features.folder import feature_dir_of
    from qin.features.io import load_features
    from qin.features.pipeline import build_features
    from qin.predict import load_run
    from qin.runs import new_run_dir
    from qin.submission import submission_paths, write_submission
    from qin.synth import DEFAULT_PARAMS, SynthSize, synthesize
    from qin.train import fit

    raw_dir = Path(cfg.data.raw_dir)
    if raw_dir.name != "MicroLens_1M_x1":
        raise QinError(f"data.raw_dir of the demo config must end in MicroLens_1M_x1, got {raw_dir}")
    submission_paths(submission, make_zip=False)  # a refused --out fails now, not after training
    data_root = raw_dir.parent
    hidden = data_root / "hidden"
    meta_path = hidden / "meta.json"
    existing = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    current = json.loads(json.dumps(asdict(DEFAULT_PARAMS)))  # as meta.json stores them
    if existing.get("size") == size and existing.get("seed") == seed and existing.get("params") == current:
        console.print(f"[1/4] demo data already in {data_root} (size {size}, seed {seed})")
    else:
        console.print(f"[1/4] generating the {size} demo data set in {data_root}")
        synthesize(data_root, SynthSize(size), seed=seed)

    console.print("[2/4] preprocessing")
    item_info = Path(cfg.data.item_info) if cfg.data.item_info else None
    built = build_features(raw_dir, feature_dir_of(cfg.data), cfg.data.max_len, item_info=item_info)
    console.print(f"      features: {built.feature_dir} ({'rebuilt' if built.rebuilt else 'up to date'})")

    console.print(f"[3/4] training {cfg.model.name.value}")
    run_dir = new_run_dir(Path(cfg.train.run_root), cfg.model.name.value)
    fit(cfg, load_features(built.feature_dir), run_dir, console=console)

    console.print("[4/4] predicting the test split")
    run = load_run(run_dir)
    sidecar = write_submission(run, submission)
    evaluation = evaluate_run(run, hidden)
    return {"run_dir": str(run_dir), "submission": sidecar["submission"], "valid_auc": evaluation["auc"],
            "oracle_auc": evaluation["oracle_auc"], "valid_logloss": evaluation["logloss"]}
