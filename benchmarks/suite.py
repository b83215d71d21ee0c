"""The data-regime suite: every model beside the baseline ladder on data sets from two generators.

    python benchmarks/quality.py --suite [--sizes small bench] [--datasets synth logs ...]
                                         [--models mean_pool_mlp qin qin_plus ...] [--seeds 0 1 2]
    python benchmarks/quality.py --suite --report        # tables from the stored results only

Data sets (`SUITE`): `qin synth` at several knob settings and `qin synth --process logs`, an independent
generator with long-tail items, id-only co-occurrence, weak content vectors, drifting interests, label
noise and short histories. Each is drawn once per size (seed 0) under benchmarks/work/suite/.

Every model trains with the same budget (configs/budget.yaml with `model.name` set, and for `qnn_alpha` the
bounded tower of configs/qnn_alpha.yaml; `qin_plus` is configs/qin_plus.yaml over the same budget; the zoo
models `dcnv2`, `dlf` and `transformer_dcn` are their configs/<name>.yaml with the budget's own keys laid over
them, `transformer_dcn_as_published` the same with the published mask bug, `transformer_dcn_lowrank` its
low-rank cross at the budget's learning rate (configs/transformer_dcn_lowrank.yaml), and `din_sa` the budget
with `model.name` set, as `din`), selects its checkpoint on validation AUC, and is scored on the TEST split,
whose labels and true click probabilities the generator keeps in hidden/: so the reported AUC is not the one
the checkpoint was picked on. Beside it: the oracle's test AUC, the lift over chance as a share of the
oracle's, (AUC - .5) / (oracle - .5), test logloss against the base rate's, epochs and seconds; and the test
GAUC (per-user AUC weighted by the user's rows), normalised entropy (logloss over the entropy of the test
click rate) and calibration ratio (predicted over observed clicks), with the oracle's GAUC and NE
(qin/metrics.py has the definitions). The baseline ladder (qin/baselines.py) is fitted on train and scored on
the same test rows (AUC and logloss only).

Results accumulate in benchmarks/results/suite/<data set>_<size>.json (one record per model and seed,
keyed by the run's config, so an interrupted suite resumes where it stopped) and the tables go to
benchmarks/results/suite.md. The key is the config, not the code: after changing a model's code, delete its
rows (or the file) to measure it again. Results stored before GAUC/NE/calibration were recorded show those
cells blank in the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from benchlib import write_json
from rich.console import Console

from qin.baselines import fit_ladder
from qin.config import Config
from qin.features.folder import feature_dir_for
from qin.features.io import load_features
from qin.features.pipeline import build_features
from qin.metrics import auc, calibration_ratio, gauc, logloss, normalized_entropy
from qin.predict import load_run, score_split
from qin.synth import SynthSize, params_with, synthesize

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "suite"
RESULTS = ROOT / "benchmarks" / "results" / "suite"
BUDGET = ROOT / "configs" / "budget.yaml"
QIN_PLUS = ROOT / "configs" / "qin_plus.yaml"


@dataclass(frozen=True)
class DataSet:
    name: str
    process: str  # "demo" (qin synth) or "logs" (qin.loggen)
    params: tuple[str, ...]  # generator overrides NAME=VALUE
    what: str


SUITE = [
    DataSet("synth", "demo", (), "qin synth defaults: sharp softmax-shaped interest match, 16-d latents"),
    DataSet("synth_relu", "demo", ("attention=relu", "relu_scale=1.4"),
            "qin synth with ASTA-shaped (ReLU, unnormalised) attention in the click logit"),
    DataSet("synth_dlat64", "demo", ("d_lat=64",), "qin synth with 64-d item latents"),
    DataSet("logs", "logs", (), "the second generator: log-like data (long tail, cold items, id-only "
            "co-occurrence, weak content, drifting interests, label noise, short histories)"),
    DataSet("logs_id_heavy", "logs", ("w_series=3.0", "item_bias_sd=1.2", "content_taste_noise=0.9"),
            "the second generator where ids carry more and content less: stronger series co-occurrence "
            "and item biases, content vectors twice as noisy"),
]
MODELS = ["mean_pool_mlp", "qin", "din", "qnn_alpha", "qin_plus", "dcnv2", "dlf", "din_sa", "transformer_dcn",
          "transformer_dcn_as_published", "transformer_dcn_lowrank"]
SIZES = ["small", "bench"]
# The model zoo (configs/<name>.yaml): each model's own keys (its structure, its loss form, a published
# learning rate) with configs/budget.yaml's own keys laid over them, so every model gets the budget's
# embedding width, batch size, epochs and patience.
ZOO = {"dcnv2": "dcnv2", "dlf": "dlf", "transformer_dcn": "transformer_dcn",
       "transformer_dcn_as_published": "transformer_dcn",
       "transformer_dcn_lowrank": "transformer_dcn_lowrank"}


def model_config(model: str, raw_dir: Path, seed: int, threads: int | None = None,
                 overrides: Sequence[str] = ()) -> Config:
    """The suite's config of one model: the common budget with `model.name` set (qin_plus: its own yaml,
    over the same budget; the zoo: its yaml under the budget's own keys). `overrides` (section.key=value,
    read as `--set` reads them) come last, so they win (benchmarks/probe.py)."""
    paths = [f"data.raw_dir={raw_dir}", f"data.features_root={WORK / 'features'}",
             f"train.run_root={WORK / 'runs'}", f"train.seed={seed}",
             f"train.threads={'null' if threads is None else threads}"]
    if model == "qin_plus":
        return Config.from_yaml(QIN_PLUS, [*paths, *overrides])
    if model in ZOO:
        if model == "transformer_dcn_as_published":
            paths.append("model.transformer_mask=as_published")
        return Config.from_yaml([ROOT / "configs" / f"{ZOO[model]}.yaml", BUDGET], [*paths, *overrides])
    if model == "qnn_alpha":  # as configs/qnn_alpha.yaml trains it: the bounded tower
        paths.append("model.qnn_alpha_bounded=true")
    return Config.from_yaml(BUDGET, [*paths, f"model.name={model}", *overrides])


def draw(dataset: DataSet, size: str, console: Console) -> Path:
    """The data set's folder (drawn once; redrawn when the generator's recorded parameters differ)."""
    digest = hashlib.sha256(json.dumps([dataset.process, dataset.params]).encode()).hexdigest()[:8]
    root = WORK / "data" / f"{dataset.name}-{size}-{digest}"
    meta_path = root / "hidden" / "meta.json"
    if dataset.process == "demo":
        params = params_with(list(dataset.params))
        wanted = json.loads(json.dumps(asdict(params)))
        if not meta_path.is_file() or json.loads(meta_path.read_text())["params"] != wanted:
            console.log(f"drawing {dataset.name} {size}")
            synthesize(root, SynthSize(size), seed=0, images=False, progress=False, params=params)
    else:
        from qin.loggen import LogSize, generate_logs, log_params_with

        params = log_params_with(list(dataset.params))
        wanted = json.loads(json.dumps(asdict(params)))
        if not meta_path.is_file() or json.loads(meta_path.read_text())["params"] != wanted:
            console.log(f"drawing {dataset.name} {size}")
            generate_logs(root, LogSize(size), seed=0, params=params, progress=False)
    return root


def test_truth(data_root: Path, test_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and p_true of the test rows, in the feature folder's row order (by ID)."""
    truth = pl.read_parquet(data_root / "hidden" / "test_truth.parquet").sort("ID")
    ids = truth["ID"].to_numpy()
    position = np.searchsorted(ids, test_ids)
    if not np.array_equal(ids[position], test_ids):
        raise ValueError(f"{data_root}: test IDs of the features and of hidden/test_truth.parquet differ")
    return truth["label"].to_numpy()[position].astype(np.float64), truth["p_true"].to_numpy()[position]


def config_key(cfg: Config) -> str:
    """What makes two runs the same measurement: the config without its paths and thread count."""
    plain = cfg.to_dict()
    for section, key in (("data", "raw_dir"), ("data", "features_root"), ("train", "run_root"),
                         ("train", "threads")):
        plain[section].pop(key)
    if not plain["train"]["cpu_bf16"]:  # added after rows were stored: at its default (float32) it is left
        plain["train"].pop("cpu_bf16")  # out, so those rows still match
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:12]


def run_one(dataset: DataSet, size: str, models: list[str], seeds: list[int], threads: int | None,
            console: Console) -> None:
    from qin.train import fit

    data_root = draw(dataset, size, console)
    meta = json.loads((data_root / "hidden" / "meta.json").read_text())
    result_path = RESULTS / f"{dataset.name}_{size}.json"
    record: dict[str, Any] = json.loads(result_path.read_text()) if result_path.is_file() else {"runs": []}
    raw_dir = data_root / "MicroLens_1M_x1"
    base = model_config("qin", raw_dir, 0)
    feature_dir = feature_dir_for(Path(base.data.features_root), raw_dir, base.data.max_len, None)
    built = build_features(raw_dir, feature_dir, base.data.max_len, progress=False)
    features = load_features(built.feature_dir)
    test = features.split("test")
    labels, p_true = test_truth(data_root, np.asarray(test.ids))
    users = np.asarray(test.user_id)  # same row order as labels (test_truth aligns by the split's IDs)
    base_rate = float(np.asarray(features.split("train").label).mean())
    record.update({
        "dataset": dataset.name, "size": size, "what": dataset.what, "process": dataset.process,
        "generator_params": list(dataset.params), "max_len": base.data.max_len,
        "rows": {split: int(np.asarray(features.split(split).item_id).size)
                 for split in ("train", "valid", "test")},
        "oracle_test_auc": auc(labels, p_true), "oracle_valid_auc": meta["auc"]["oracle_valid"],
        "oracle_test_logloss": logloss(labels, p_true),
        "oracle_test_gauc": gauc(labels, p_true, users), "oracle_test_ne": normalized_entropy(labels, p_true),
        "base_rate_test_logloss": logloss(labels, np.full(labels.size, base_rate)),
        "baselines": [{"name": b.name.value, "test_auc": b.auc, "test_logloss": b.logloss}
                      for b in fit_ladder(features, "test", labels)],
    })
    # Re-read before writing: another suite process may have added runs while the ladder was fitted.
    record["runs"] = json.loads(result_path.read_text())["runs"] if result_path.is_file() else []
    write_json(result_path, record)
    for model in models:
        for seed in seeds:
            cfg = model_config(model, raw_dir, seed, threads)
            key = config_key(cfg)
            if any(r["model"] == model and r["seed"] == seed and r["config_key"] == key
                   for r in record["runs"]):
                continue
            run_dir = WORK / "runs" / f"{dataset.name}-{size}" / f"{model}-s{seed}"
            started = time.perf_counter()
            result = fit(cfg, features, run_dir, console=console, progress=False)
            seconds = time.perf_counter() - started
            loaded = load_run(run_dir)
            probabilities = score_split(loaded, "test")
            train_losses = [e["train_loss"] for e in result.evaluations]
            row = {"model": model, "seed": seed, "config_key": key, "valid_auc": result.valid_auc,
                   "test_auc": auc(labels, probabilities), "test_logloss": logloss(labels, probabilities),
                   "test_gauc": gauc(labels, probabilities, users),
                   "test_ne": normalized_entropy(labels, probabilities),
                   "test_calibration": calibration_ratio(labels, probabilities),
                   "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "max_train_loss": max(train_losses), "seconds": round(seconds, 1),
                   "parameters": sum(p.numel() for p in loaded.model.parameters())}
            # Re-read before writing: another suite process may have added runs to this file meanwhile.
            stored = json.loads(result_path.read_text())["runs"] if result_path.is_file() else []
            record["runs"] = [r for r in stored if not (r["model"] == model and r["seed"] == seed)] + [row]
            write_json(result_path, record)
            console.log(f"{dataset.name} {size} {model} seed {seed}: test AUC {row['test_auc']:.4f} "
                        f"(oracle {record['oracle_test_auc']:.4f}), GAUC {row['test_gauc']:.4f} "
                        f"(oracle {record['oracle_test_gauc']:.4f}), NE {row['test_ne']:.4f}, "
                        f"calibration {row['test_calibration']:.3f} in {row['seconds']} s")


def lift(value: float, oracle: float) -> float:
    return (value - 0.5) / (oracle - 0.5)


def stored_results() -> list[tuple[Any, str, dict[str, Any]]]:
    """(data set, size, stored result) for every data set and size that has a result file, in suite order."""
    found = []
    for dataset in SUITE:
        for size in SIZES:
            path = RESULTS / f"{dataset.name}_{size}.json"
            if path.is_file():
                found.append((dataset, size, json.loads(path.read_text())))
    return found


def auc_table() -> str:
    """Markdown table from every stored result: test AUC (mean over seeds, with spread), the strongest model
    of each row with its lift and margin over the best logistic regression, and its logloss."""
    lines = ["| data set | size | oracle | popularity | LR 2 | LR 2 + levels | " + " | ".join(MODELS)
             + " | strongest: lift | − LR 2+lv | logloss / base rate |",
             "|---|---|---|---|---|---|" + "---|" * len(MODELS) + "---|---|---|"]
    for dataset, size, record in stored_results():
        oracle = record["oracle_test_auc"]
        ladder = {b["name"]: b["test_auc"] for b in record["baselines"]}
        cells = [dataset.name, size, f"{oracle:.4f}", f"{ladder['popularity']:.4f}",
                 f"{ladder['lr_2']:.4f}", f"{ladder['lr_2_levels']:.4f}"]
        means = {}
        for model in MODELS:
            runs = [r for r in record["runs"] if r["model"] == model]
            if not runs:
                cells.append("")
                continue
            aucs = [r["test_auc"] for r in runs]
            means[model] = statistics.mean(aucs)
            spread = f" ±{(max(aucs) - min(aucs)) / 2:.4f} ({len(aucs)})" if len(aucs) > 1 else ""
            cells.append(f"{means[model]:.4f}{spread}")
        if means:
            top = max(means, key=means.__getitem__)
            cells[6 + MODELS.index(top)] = f"**{cells[6 + MODELS.index(top)]}**"
            logloss_mean = statistics.mean(r["test_logloss"] for r in record["runs"] if r["model"] == top)
            cells += [f"`{top}` {100 * lift(means[top], oracle):.1f}%",
                      f"{means[top] - max(ladder['lr_2'], ladder['lr_2_levels']):+.4f}",
                      f"{logloss_mean:.4f} / {record['base_rate_test_logloss']:.4f}"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(runs: list[dict[str, Any]], key: str) -> tuple[float, int] | None:
    """Mean of `key` over the runs that recorded it (older results lack the newer metrics), and their number;
    None when none did or every value is undefined (NaN)."""
    values = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
    return (statistics.mean(values), len(values)) if values else None


def gauc_ne_table() -> str:
    """Markdown table from every stored result: per model, test GAUC · NE · calibration ratio (means over the
    seeds that recorded them, with their number when more than one); the best GAUC of a row in bold; blank
    where a result predates these metrics."""
    lines = ["| data set | size | oracle GAUC · NE | " + " | ".join(MODELS) + " |",
             "|---|---|---|" + "---|" * len(MODELS)]
    for dataset, size, record in stored_results():
        oracle = [record.get(k) for k in ("oracle_test_gauc", "oracle_test_ne")]
        cells = [dataset.name, size, " · ".join(f"{v:.4f}" for v in oracle) if None not in oracle else ""]
        gaucs: dict[int, float] = {}
        for model in MODELS:
            runs = [r for r in record["runs"] if r["model"] == model]
            measured = _mean(runs, "test_gauc")
            if measured is None:
                cells.append("")
                continue
            gaucs[len(cells)] = measured[0]
            ne, calibration = _mean(runs, "test_ne"), _mean(runs, "test_calibration")
            parts = [f"{measured[0]:.4f}", f"{ne[0]:.4f}" if ne else "–",
                     f"{calibration[0]:.3f}" if calibration else "–"]
            cells.append(" · ".join(parts) + (f" ({measured[1]})" if measured[1] > 1 else ""))
        if gaucs:
            best = max(gaucs, key=gaucs.__getitem__)
            cells[best] = f"**{cells[best]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lift_table(size: str = "small") -> str:
    """Markdown table: each model's lift over chance as a share of the oracle's, (AUC - .5) / (oracle - .5),
    on every data set of `size` (mean over its seeds, their number in brackets when more than one), with the
    mean and the worst over the data sets; a model missing a data set gets no mean. Best of a column bold."""
    records = [(dataset, record) for dataset, stored_size, record in stored_results() if stored_size == size]
    names = ["LR 2 + levels", *MODELS]
    cells: dict[str, list[float | None]] = {name: [] for name in names}
    seeds: dict[str, list[int]] = {name: [] for name in names}
    for _, record in records:
        oracle = record["oracle_test_auc"]
        ladder = {b["name"]: b["test_auc"] for b in record["baselines"]}
        cells["LR 2 + levels"].append(lift(ladder["lr_2_levels"], oracle))
        seeds["LR 2 + levels"].append(1)
        for model in MODELS:
            aucs = [r["test_auc"] for r in record["runs"] if r["model"] == model]
            cells[model].append(lift(statistics.mean(aucs), oracle) if aucs else None)
            seeds[model].append(len(aucs))
    lines = [f"| model ({size}) | " + " | ".join(d.name for d, _ in records) + " | mean | worst |",
             "|---|" + "---|" * (len(records) + 2)]
    columns = list(zip(*(cells[name] for name in names), strict=True)) if records else []
    best = [max((v for v in column if v is not None), default=None) for column in columns]
    summary = {name: (statistics.mean(values), min(values)) for name, values in cells.items()
               if values and None not in values}
    best_mean = max((mean for mean, _ in summary.values()), default=None)
    for name in names:
        row = [f"`{name}`" if name in MODELS else name]
        for index, value in enumerate(cells[name]):
            if value is None:
                row.append("")
                continue
            text = f"{100 * value:.1f}%" + (f" ({seeds[name][index]})" if seeds[name][index] > 1 else "")
            row.append(f"**{text}**" if value == best[index] else text)
        if name in summary:
            mean, worst = summary[name]
            mean_text = f"{100 * mean:.1f}%"
            row += [f"**{mean_text}**" if mean == best_mean else mean_text, f"{100 * worst:.1f}%"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report() -> str:
    """The report's tables, as markdown: test AUC with the baseline ladder, the lift of every model on every
    `small` data set, then GAUC, NE and calibration."""
    return (auc_table() + "\n\nLift over chance as a share of the oracle's, per data set (`small`; several "
            "seeds: the lift of their mean AUC, their number in brackets):\n\n" + lift_table()
            + "\n\nTest GAUC (per-user AUC, users weighted by their rows) · normalised entropy "
            "(logloss / entropy of the test click rate, lower is better) · calibration (predicted / observed "
            "clicks); blank: not recorded by that run.\n\n" + gauc_ne_table())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the data-regime quality suite")
    parser.add_argument("--sizes", nargs="*", default=SIZES, choices=SIZES)
    parser.add_argument("--datasets", nargs="*", default=[d.name for d in SUITE],
                        choices=[d.name for d in SUITE])
    parser.add_argument("--models", nargs="*", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (not math)")
    parser.add_argument("--report", action="store_true", help="only print the tables of stored results")
    args = parser.parse_args(argv)
    console = Console()
    if not args.report:
        for size in args.sizes:
            for dataset in SUITE:
                if dataset.name in args.datasets:
                    run_one(dataset, size, args.models, args.seeds, args.threads, console)
    table = report()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS.parent / "suite.md").write_text(
        "Test AUC (mean over seeds ± half the range, (number of seeds)); generated by "
        "`python benchmarks/quality.py --suite --report`.\n\n" + table + "\n")
    write_readme_block()
    print(table)


def write_readme_block() -> None:
    """The README's quality tables (between its `quality:start` and `quality:end` markers): test AUC, then the
    lift of every model per `small` data set."""
    readme = ROOT / "README.md"
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    text = readme.read_text()
    if start not in text or end not in text:
        return
    block = (f"{start}\n{auc_table()}\n\nLift over chance as a share of the oracle's, per `small` data set "
             "(several seeds: the lift of their mean AUC, their number in brackets):"
             f"\n\n{lift_table()}\n{end}")
    head, rest = text.split(start, 1)
    readme.write_text(head + block + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
