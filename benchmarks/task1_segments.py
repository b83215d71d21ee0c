"""Task 1 on the log-like sets: where on the test rows each item table gains or loses, and variants of the
tuned table.

The Task-1 benchmark (benchmarks/embeddings.py) gives one test AUC per item table. On the log-like
generator the click logit has parts only some rows exercise, so this splits the test rows of one data set
by what the generator knows of their target:

* cold: the target is a cold item (released after the train period: in no training history, so its
  tuned vector is its content through the tuned head);
* series-mate: a warm target with at least one item of its hidden series in the row's history (the
  w_series term; only co-occurrence can reveal a series);
* rest: every other row (taste match, quality, bias, popularity).

Tables: the benchmark's `organisers`, `tuned` and `true_latents` (the same files, built by
benchmarks/embeddings.py's `make_table`), and variants of `tuned` built here from it:

* tuned_pop: the tuned vectors on their top 127 principal directions (re-normalised) beside a popularity
  channel, 0.3 · z(log count in training histories) (cold items: 0, the warm mean);
* tuned_content16 / tuned_content32: k = 16 / 32 dimensions of the content's principal components beside
  the tuned vectors' top 128 - k, weighted sqrt(k/128) : sqrt(1 - k/128) as `--content-share k/128` weights
  its two parts (an approximation of it that needs no new tuning);
* tuned_coldknn: warm items as tuned; a cold item gets the normalised mean of the tuned vectors of its
  10 nearest warm items by content cosine (a vector like the warm ones DIN trained on) instead of its
  content through the tuned head;
* tuned_coldzero: warm items as tuned, cold items all zero (what DIN's multimodal projection maps to 0: the
  row falls back on ids, tags and levels).

Results: benchmarks/results/task1_segments/<data set>_small.json (one row per table and seed; re-run to
add), and the markdown table docs/quality.md quotes goes to benchmarks/results/task1_segments_<data set>.md.

    python benchmarks/task1_segments.py --dataset logs_id_heavy --tables organisers tuned --seeds 0 1
    python benchmarks/task1_segments.py --dataset logs_id_heavy --report
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import write_json  # noqa: E402
from embeddings import SIZE, WORK, make_table, redraw_logs, train_din  # noqa: E402
from suite import SUITE, DataSet, draw  # noqa: E402

from qin.embed.tables import read_item_info, write_item_table  # noqa: E402
from qin.embed.tune import read_histories  # noqa: E402
from qin.embed.vectors import l2_normalise, pca_reduce  # noqa: E402
from qin.features.raw import ITEM_EMB  # noqa: E402
from qin.metrics import auc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "task1_segments"
BASE_TABLES = ("organisers", "tuned", "true_latents")
VARIANTS = ("tuned_pop", "tuned_content16", "tuned_content32", "tuned_coldknn", "tuned_coldzero")
SEGMENTS = ("all", "cold", "series_mate", "rest")


def table_vectors(path: Path) -> np.ndarray:
    """(N + 1, 128) float64 item_emb_d128 of an item table, row 0 = padding."""
    return np.stack(read_item_info(path)[ITEM_EMB].to_list()).astype(np.float64)


def make_variant(variant: str, tuned: Path, content: Path, train: Path, out: Path) -> Path:
    """Write a variant of the tuned table (see the module docstring) to `out` (rebuilt every run, in
    seconds, so it always follows the tuned table on disk; the feature folder is keyed by its content)."""
    vectors = table_vectors(tuned)
    table = np.zeros_like(vectors)
    counts = np.bincount(read_histories(train).ravel(), minlength=vectors.shape[0]).astype(np.float64)
    counts[0] = 0
    warm = counts > 0  # (N + 1,) items in a training history; row 0 (padding) is neither warm nor cold
    cold = ~warm
    cold[0] = False
    if variant == "tuned_pop":
        log_counts = np.log(counts[warm])
        channel = np.zeros(vectors.shape[0])
        channel[warm] = (log_counts - log_counts.mean()) / log_counts.std()
        table[1:, :127] = l2_normalise(pca_reduce(vectors[1:], 127).vectors)
        table[1:, 127] = 0.3 * channel[1:]
    elif variant in ("tuned_coldknn", "tuned_coldzero"):
        table[:] = vectors
        table[cold] = 0
        if variant == "tuned_coldknn":
            content_unit = l2_normalise(table_vectors(content))
            similarity = content_unit[cold] @ content_unit[warm].T  # (cold, warm)
            nearest = np.argsort(-similarity, axis=1)[:, :10]
            table[cold] = l2_normalise(vectors[warm][nearest].mean(axis=1))
    else:
        k = int(variant.removeprefix("tuned_content"))
        share = np.sqrt(k / 128)
        table[1:, :k] = share * l2_normalise(pca_reduce(table_vectors(content)[1:], k).vectors)
        table[1:, k:] = np.sqrt(1 - share**2) * l2_normalise(pca_reduce(vectors[1:], 128 - k).vectors)
    write_item_table(read_item_info(content), table[1:].astype(np.float32), out)
    return out


def segments(dataset: DataSet, data_root: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """(n,) bool masks of the test rows (in `ids` order) per segment, from the generator's redrawn truth."""
    drawn = redraw_logs(dataset, data_root / "MicroLens_1M_x1" / "item_info.parquet")
    truth = drawn.items
    test = pl.read_parquet(data_root / "MicroLens_1M_x1" / "test.parquet").sort("ID")
    if not np.array_equal(test["ID"].to_numpy(), ids):
        raise SystemExit(f"{data_root}: test.parquet's IDs differ from the feature folder's test rows")
    targets = test["item_id"].to_numpy()
    mates = np.array([int((truth.series[[h for h in history if h]] == truth.series[target]).sum())
                      for history, target in zip(test["item_seq"].to_list(), targets, strict=True)])
    cold = truth.cold[targets]
    return {"all": np.ones_like(cold), "cold": cold, "series_mate": (mates > 0) & ~cold,
            "rest": (mates == 0) & ~cold}


def run(dataset: DataSet, tables: list[str], seeds: list[int], threads: int | None, console: Console) -> None:
    data_root = draw(dataset, SIZE, console)
    raw = data_root / "MicroLens_1M_x1"
    work = WORK / "task1" / f"{dataset.name}-{SIZE}"
    result_path = RESULTS / f"{dataset.name}_{SIZE}.json"
    masks: dict[str, np.ndarray] | None = None
    for table in tables:
        if table in VARIANTS:
            tuned, _ = make_table("tuned", dataset, data_root, work / "tables")
            content, _ = make_table("organisers", dataset, data_root, work / "tables")
            out = work / "tables" / f"{table}.parquet"
            path = make_variant(table, tuned, content, raw / "train.parquet", out)
        else:
            path, _ = make_table(table, dataset, data_root, work / "tables")
        for seed in seeds:
            started = time.perf_counter()
            run_dir = work / "runs" / f"segments-{table}-s{seed}"
            scored = train_din(data_root, path, work, seed, threads, run_dir, console)
            if masks is None:
                masks = segments(dataset, data_root, scored.ids)
            row: dict[str, Any] = {"table": table, "seed": seed,
                                   "seconds": round(time.perf_counter() - started, 1),
                                   "auc": {s: auc(scored.labels[m], scored.probabilities[m])
                                           for s, m in masks.items()},
                                   "oracle_auc": {s: auc(scored.labels[m], scored.p_true[m])
                                                  for s, m in masks.items()},
                                   "rows": {s: int(m.sum()) for s, m in masks.items()}}
            stored = json.loads(result_path.read_text())["runs"] if result_path.is_file() else []
            write_json(result_path, {"benchmark": "task1_segments", "dataset": dataset.name, "size": SIZE,
                                     "runs": [r for r in stored if (r["table"], r["seed"]) != (table, seed)]
                                     + [row]})
            console.log(f"{dataset.name} {table} seed {seed}: " + "  ".join(
                f"{s} {row['auc'][s]:.4f}" for s in SEGMENTS))


def report(dataset: DataSet) -> str:
    """Markdown: test AUC per segment for each table (mean over the stored seeds), the oracle's last."""
    record = json.loads((RESULTS / f"{dataset.name}_{SIZE}.json").read_text())
    runs = record["runs"]
    head = runs[0]
    lines = [f"| table ({dataset.name}) | " + " | ".join(f"{s} ({head['rows'][s]} rows)" for s in SEGMENTS)
             + " |", "|---|" + "---|" * len(SEGMENTS)]
    for table in [t for t in BASE_TABLES + VARIANTS if any(r["table"] == t for r in runs)]:
        mine = [r for r in runs if r["table"] == table]
        seeds = ",".join(str(r["seed"]) for r in mine)
        lines.append(f"| `{table}` (seed {seeds}) | " + " | ".join(
            f"{np.mean([r['auc'][s] for r in mine]):.4f}" for s in SEGMENTS) + " |")
    lines.append("| oracle | " + " | ".join(f"{head['oracle_auc'][s]:.4f}" for s in SEGMENTS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    logs = [d.name for d in SUITE if d.process == "logs"]
    parser.add_argument("--dataset", default="logs_id_heavy", choices=logs)
    parser.add_argument("--tables", nargs="*", default=list(BASE_TABLES), choices=BASE_TABLES + VARIANTS)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (not math)")
    parser.add_argument("--report", action="store_true", help="only print the table of stored results")
    args = parser.parse_args()
    dataset = next(d for d in SUITE if d.name == args.dataset)
    if not args.report:
        run(dataset, args.tables, args.seeds, args.threads, Console())
    table = report(dataset)
    (RESULTS.parent / f"task1_segments_{dataset.name}.md").write_text(
        f"Task 1 on `{dataset.name}` (small): test AUC of the organisers' DIN by target segment, mean over "
        "the seeds shown; generated by `python benchmarks/task1_segments.py --report`.\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
