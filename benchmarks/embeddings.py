"""Task-1 benchmark: the organisers' DIN held fixed, trained on each item table, across the data-regime suite.

In the challenge's Task 1 the CTR model is fixed (the organisers' DIN; five training keys may be tuned) and
an entry is a 128-d vector per item. This benchmark trains configs/task1_din.yaml (the DIN of
configs/din.yaml; the same settings for every table) on each item table of each data set of the quality
suite (benchmarks/suite.py: the same drawn data under benchmarks/work/suite/), picks the checkpoint on
validation AUC and scores it on the TEST split against the labels and true click probabilities the
generator kept in hidden/.

Item tables (`TABLES`):

* organisers: the organisers' recipe, `qin embed --from precomputed` (txt_emb_BERT ++ img_emb_CLIPRN50,
  PCA 128). The log-like generator has no raw content to apply a recipe to: its own item_emb_d128 (a weak,
  noisy, PCA-shaped view of the taste latent) stands in for it there.
* generated: the data's own item_info.parquet (on `qin synth` data the generator applies the organisers'
  recipe itself, so this is the organisers' table to float rounding; on log data it is the organisers' row).
* content_text: `qin embed --from content`, the titles through the bundled all-MiniLM-L6-v2, PCA 128 (no
  image model on this machine); `qin synth` data only (log data has no titles).
* tuned: `qin embed --tune histories` over the organisers' table (qin/embed/tune.py: InfoNCE on items that
  co-occur in training histories, item_seq only, never a label), seed 0, default settings.
* tuned_dropout: the same with `--residual-dropout 0.2` (a fifth of every batch scored on content alone).
* none: every vector zero (the model has ids, tags and levels only).
* true_latents: the ceiling, what the generator knows of an item: `qin synth`'s 16-d latent v; on log data
  the unit taste latent, the item's quality, bias and popularity z-score and a random unit code of its hidden
  series (items of one series share it), zero-padded to 128.

Results accumulate in benchmarks/results/embeddings/<data set>_<size>.json (one run per table and seed, keyed
by the run's config, so an interrupted run resumes; re-read before every write, so processes working on
different data sets may share the folder), and the tables go to benchmarks/results/embeddings.md and the
README (between `task1:start` and `task1:end`).

    python benchmarks/embeddings.py [--datasets synth logs ...] [--tables organisers tuned ...]
                                    [--seeds 0 1 2] [--threads 1]
    python benchmarks/embeddings.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_json  # noqa: E402
from suite import SUITE, DataSet, config_key, draw, lift, test_truth  # noqa: E402

from qin.config import Config  # noqa: E402
from qin.embed import embed_from_content, embed_from_precomputed  # noqa: E402
from qin.embed.tables import read_item_info, write_item_table  # noqa: E402
from qin.embed.tune import TuneSettings, tune_on_histories  # noqa: E402
from qin.features.folder import feature_dir_for  # noqa: E402
from qin.features.io import load_features  # noqa: E402
from qin.features.pipeline import build_features  # noqa: E402
from qin.features.raw import ITEM_EMB  # noqa: E402
from qin.loggen import LogDraw  # noqa: E402
from qin.metrics import auc, logloss  # noqa: E402
from qin.predict import load_run, score_split  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work" / "suite"
RESULTS = ROOT / "benchmarks" / "results" / "embeddings"
CONFIG = ROOT / "configs" / "task1_din.yaml"
TABLES = ("organisers", "generated", "content_text", "tuned", "tuned_dropout", "none", "true_latents")
DESCRIPTIONS = {
    "organisers": "organisers' recipe: txt_emb_BERT ++ img_emb_CLIPRN50, PCA 128 (log data: its own "
                  "item_emb_d128)",
    "generated": "the data's item_info.parquet as generated",
    "content_text": "titles through all-MiniLM-L6-v2, PCA 128",
    "tuned": "qin embed --tune histories over the organisers' table",
    "tuned_dropout": "the same with --residual-dropout 0.2",
    "none": "all-zero vectors",
    "true_latents": "the generator's item latents (the ceiling)",
}
SIZE = "small"


def applies(table: str, dataset: DataSet) -> bool:
    """Whether a table exists for a data set: log data has no titles, and its organisers' row is its own
    generated table (measured once, under `organisers`)."""
    return dataset.process == "demo" or table not in ("content_text", "generated")


def zero_table(item_info: Path, out: Path) -> None:
    info = read_item_info(item_info)
    write_item_table(info, np.zeros((info.height - 1, 128), dtype=np.float32), out)


def redraw_logs(dataset: DataSet, item_info: Path) -> LogDraw:
    """The log-like data set's generator state, redrawn from its recorded parameters
    (seed 0, as suite.draw drew it); checked against the drawn item_info so a changed generator cannot go
    unnoticed."""
    from qin.loggen import LogSize, draw_logs, log_params_with

    drawn = draw_logs(LogSize(SIZE), seed=0, params=log_params_with(list(dataset.params)))
    info = read_item_info(item_info)
    stored = np.stack(info[ITEM_EMB].to_list())[1:]
    if not np.allclose(stored, drawn.item_emb[1:], atol=1e-5):
        raise SystemExit(f"{item_info}: the redrawn generator's item_emb_d128 differs from the data on disk; "
                         "delete the suite's data folder so it is drawn again")
    return drawn


def log_latents(dataset: DataSet, item_info: Path) -> np.ndarray:
    """(N, 128) true item latents of a log-like data set (`redraw_logs`)."""
    drawn = redraw_logs(dataset, item_info)
    items = drawn.items
    n_series = int(items.series.max()) + 1
    codes = np.random.default_rng(0).standard_normal((n_series, 32))
    codes /= np.linalg.norm(codes, axis=1, keepdims=True)
    scalars = np.stack([items.quality, items.bias, items.pop_z], axis=1)  # (N+1, 3)
    latents = np.concatenate([items.taste, scalars, codes[np.maximum(items.series, 0)]], axis=1)[1:]
    out = np.zeros((latents.shape[0], 128), dtype=np.float32)
    out[:, : latents.shape[1]] = latents
    return out


def synth_latents(data_root: Path) -> np.ndarray:
    """(N, 128): `qin synth`'s latent v of items 1..N, zero-padded."""
    latents = pl.read_parquet(data_root / "hidden" / "item_latent.parquet").sort("item_id")
    v = np.stack(latents["v"].to_list())
    out = np.zeros((v.shape[0], 128), dtype=np.float32)
    out[:, : v.shape[1]] = v
    return out


def make_table(table: str, dataset: DataSet, data_root: Path, tables_dir: Path) -> tuple[Path, dict]:
    """The item table's path (written on first use) and facts about how it was made."""
    raw = data_root / "MicroLens_1M_x1"
    item_info, item_feature = raw / "item_info.parquet", data_root / "item_feature.parquet"
    if table == "generated" or (table == "organisers" and dataset.process == "logs"):
        return item_info, {}
    out = tables_dir / f"{table}.parquet"
    started = time.perf_counter()
    facts: dict[str, Any] = {}
    if out.is_file():
        return out, facts
    if table == "organisers":
        recipe = embed_from_precomputed(item_feature, item_info, out)
        facts["pca_explained_variance"] = recipe.explained_variance
    elif table == "content_text":
        result = embed_from_content(item_feature, item_info, images_dir=None, out=out, image_model=None,
                                    cache_dir=tables_dir / "embed_cache", progress=False)
        facts["pca_explained_variance"] = result.explained_variance
    elif table in ("tuned", "tuned_dropout"):
        content, _ = make_table("organisers", dataset, data_root, tables_dir)
        settings = TuneSettings(seed=0, residual_dropout=0.2 if table == "tuned_dropout" else 0.0)
        tuned = tune_on_histories(content, raw / "train.parquet", out, settings, progress=False)
        facts.update({"warm_items": tuned.warm_items, "items": tuned.items, "histories": tuned.histories,
                      "final_loss": tuned.final_loss})
    elif table == "none":
        zero_table(item_info, out)
    elif table == "true_latents":
        latents = synth_latents(data_root) if dataset.process == "demo" else log_latents(dataset, item_info)
        write_item_table(read_item_info(item_info), latents, out)
    else:
        raise SystemExit(f"unknown table {table!r}; choose from {', '.join(TABLES)}")
    facts["make_seconds"] = round(time.perf_counter() - started, 1)
    return out, facts


def item_info_override(raw_dir: Path, item_table: Path) -> Path | None:
    """`data.item_info` for an item table: none when it is the data's own item_info."""
    return None if item_table == raw_dir / "item_info.parquet" else item_table


def din_config(raw_dir: Path, item_table: Path, work: Path, seed: int, threads: int | None) -> Config:
    """configs/task1_din.yaml on a data set and an item table, its runs under `work`/runs."""
    item_info = item_info_override(raw_dir, item_table)
    return Config.from_yaml(CONFIG, [
        f"data.raw_dir={raw_dir}", f"data.features_root={WORK / 'features'}",
        f"data.item_info={'null' if item_info is None else item_info}", f"train.run_root={work / 'runs'}",
        f"train.seed={seed}", f"train.threads={'null' if threads is None else threads}"])


@dataclass(frozen=True)
class ScoredRun:
    fit: Any  # qin.train.FitResult
    ids: np.ndarray  # (n,) test row IDs, in the order of the arrays below
    labels: np.ndarray  # (n,) test labels
    p_true: np.ndarray  # (n,) the generator's click probabilities
    probabilities: np.ndarray  # (n,) the trained DIN's


def train_din(data_root: Path, item_table: Path, work: Path, seed: int, threads: int | None, run_dir: Path,
              console: Console) -> ScoredRun:
    """Train the Task-1 DIN on one item table, pick its checkpoint on validation AUC, score the test rows."""
    from qin.train import fit

    raw_dir = data_root / "MicroLens_1M_x1"
    cfg = din_config(raw_dir, item_table, work, seed, threads)
    item_info = item_info_override(raw_dir, item_table)
    feature_dir = feature_dir_for(WORK / "features", raw_dir, cfg.data.max_len, item_info)
    built = build_features(raw_dir, feature_dir, cfg.data.max_len, item_info=item_info, progress=False)
    features = load_features(built.feature_dir)
    ids = np.asarray(features.split("test").ids)
    labels, p_true = test_truth(data_root, ids)
    result = fit(cfg, features, run_dir, console=console, progress=False)
    return ScoredRun(result, ids, labels, p_true, score_split(load_run(run_dir), "test"))


def run_dataset(dataset: DataSet, tables: list[str], seeds: list[int], threads: int | None,
                console: Console) -> None:
    data_root = draw(dataset, SIZE, console)
    raw_dir = data_root / "MicroLens_1M_x1"
    work = WORK / "task1" / f"{dataset.name}-{SIZE}"
    result_path = RESULTS / f"{dataset.name}_{SIZE}.json"
    for table in tables:
        if not applies(table, dataset):
            continue
        path, facts = make_table(table, dataset, data_root, work / "tables")
        for seed in seeds:
            key = config_key(din_config(raw_dir, path, work, seed, threads).replace("data", item_info=None))
            stored = json.loads(result_path.read_text())["runs"] if result_path.is_file() else []
            if any(r["table"] == table and r["seed"] == seed and r["config_key"] == key for r in stored):
                continue
            started = time.perf_counter()
            run_dir = work / "runs" / f"{table}-s{seed}"
            scored = train_din(data_root, path, work, seed, threads, run_dir, console)
            row = {"table": table, "seed": seed, "config_key": key, "item_table": str(path),
                   "valid_auc": scored.fit.valid_auc, "test_auc": auc(scored.labels, scored.probabilities),
                   "test_logloss": logloss(scored.labels, scored.probabilities),
                   "best_epoch": scored.fit.best_epoch, "epochs_run": scored.fit.epochs_run,
                   "seconds": round(time.perf_counter() - started, 1), **facts}
            labels, p_true = scored.labels, scored.p_true
            stored = json.loads(result_path.read_text())["runs"] if result_path.is_file() else []
            record = {"benchmark": "task1_embeddings", "dataset": dataset.name, "size": SIZE,
                      "what": dataset.what, "generator_params": list(dataset.params),
                      "config": str(CONFIG.relative_to(ROOT)),
                      "oracle_test_auc": auc(labels, p_true),
                      "runs": [r for r in stored if not (r["table"] == table and r["seed"] == seed)] + [row]}
            write_json(result_path, record)
            console.log(f"{dataset.name} {table} seed {seed}: test AUC {row['test_auc']:.4f} "
                        f"(oracle {record['oracle_test_auc']:.4f}) in {row['seconds']} s")


def _cell(runs: list[dict[str, Any]]) -> tuple[float, str] | None:
    if not runs:
        return None
    aucs = [r["test_auc"] for r in runs]
    mean = statistics.mean(aucs)
    spread = f" ±{(max(aucs) - min(aucs)) / 2:.4f} ({len(aucs)})" if len(aucs) > 1 else ""
    return mean, f"{mean:.4f}{spread}"


def report() -> str:
    """Markdown: test AUC of DIN per data set and table (mean ± half the range over seeds), the tuned table's
    margin over the organisers' recipe with the seed noise of both, the share of the gap from the organisers'
    recipe to the true-latent ceiling that tuning closes, and the lift over chance as a share of the
    oracle's of organisers / tuned / ceiling."""
    shown = [t for t in TABLES if t != "generated"]
    lines = ["| data set | oracle | " + " | ".join(f"`{t}`" for t in shown)
             + " | tuned − organisers | noise (half range: tuned / organisers) | gap to ceiling closed "
             "| lift: organisers / tuned / ceiling |",
             "|---|---|" + "---|" * len(shown) + "---|---|---|---|"]
    margins, dropout_margins = [], []
    for dataset in SUITE:
        path = RESULTS / f"{dataset.name}_{SIZE}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        oracle = record["oracle_test_auc"]
        runs = {t: [r for r in record["runs"] if r["table"] == t] for t in TABLES}
        cells = {t: _cell(runs[t]) for t in shown}
        row = [dataset.name, f"{oracle:.4f}"] + [cell[1] if cell else "" for cell in cells.values()]
        organisers, tuned, ceiling = cells["organisers"], cells["tuned"], cells["true_latents"]
        if organisers and cells["tuned_dropout"]:
            dropout_margins.append(cells["tuned_dropout"][0] - organisers[0])
        if organisers and tuned:
            margin = tuned[0] - organisers[0]
            margins.append(margin)
            noise = f"{_half_range(runs['tuned'])} / {_half_range(runs['organisers'])}"
            gap = ceiling[0] - organisers[0] if ceiling else None
            row += [f"{margin:+.4f}", noise, f"{100 * margin / gap:.0f}%" if gap and gap > 0 else ""]
        else:
            row += ["", "", ""]
        row.append(" / ".join("–" if cell is None else f"{100 * lift(cell[0], oracle):.1f}%"
                              for cell in (organisers, tuned, ceiling)))
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines)
    if margins:
        text += (f"\n\nMean margin of `tuned` over `organisers` across {len(margins)} data set(s): "
                 f"{statistics.mean(margins):+.4f} AUC.")
    if dropout_margins:
        text += (f" Of `tuned_dropout`, across {len(dropout_margins)} data set(s): "
                 f"{statistics.mean(dropout_margins):+.4f} AUC.")
    return text


def _half_range(runs: list[dict[str, Any]]) -> str:
    """Half the range of the runs' test AUCs; "–" for a single seed (no noise measured)."""
    aucs = [r["test_auc"] for r in runs]
    return f"{(max(aucs) - min(aucs)) / 2:.4f}" if len(aucs) > 1 else "–"


def write_readme_block(table: str) -> None:
    readme = ROOT / "README.md"
    start, end = "<!-- task1:start -->", "<!-- task1:end -->"
    text = readme.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(f"{head}{start}\n{table}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [d.name for d in SUITE]
    parser.add_argument("--datasets", nargs="*", default=names, choices=names)
    parser.add_argument("--tables", nargs="*", default=list(TABLES), choices=TABLES)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (not math)")
    parser.add_argument("--report", action="store_true", help="only write the tables of stored results")
    args = parser.parse_args()
    console = Console()
    if not args.report:
        for dataset in SUITE:
            if dataset.name in args.datasets:
                run_dataset(dataset, args.tables, args.seeds, args.threads, console)
    table = report()
    (RESULTS.parent / "embeddings.md").write_text(
        "Task 1: test AUC of the organisers' DIN (configs/task1_din.yaml) per item table (mean ± half the "
        "range over seeds, (number of seeds)); generated by `python benchmarks/embeddings.py --report`.\n\n"
        + table + "\n")
    write_readme_block(table)
    print(table)


if __name__ == "__main__":
    main()
