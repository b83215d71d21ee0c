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

Tables: the benchmark's `organisers`, `tuned`, `tuned_dropout` and `true_latents` (the same files, built by
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
  row falls back on ids, tags and levels);
* tuned_dropout_centred: the benchmark's tuned_dropout (`--residual-dropout 0.2`: a fifth of the batch's
  items lose their residual for the step, so cold items' vectors spread like warm ones instead of
  collapsing onto the warm centre) minus the warm items' mean vector, re-normalised (the tuned vectors
  sit in a narrow cone, mean cosine 0.65 to their centre; centring spreads them over the sphere);
* tuned_w1w8: two 64-d channels, each tuned on its own: window 1 (consecutive items: the hidden series) and
  window 8 (about the whole history: taste), concatenated with weight 1/sqrt(2) each.

tuned_w1w8's two channels are tuned on first use and kept in the tables folder beside the benchmark's
tables, like them.

Results: benchmarks/results/task1_segments/<data set>_small.json (one row per table and seed; re-run to
add), and the markdown table docs/quality.md quotes goes to benchmarks/results/task1_segments_<data set>.md.

`--information` measures instead how much of the hidden item truth the tables hold, and how much of an item's
taste its training histories can reveal at all: cross-validated ridge R^2 of the taste latent (and of log
popularity) on each table's vectors over the warm items, the share of warm items whose cosine nearest
neighbour is in their hidden series, and, as a yardstick no table built from histories should expect to
pass, the same R^2 for an oracle-context estimate: each item's taste estimated as the mean, over its
occurrences in training histories, of the mean TRUE taste of the items within `w` slots of it. Results:
<data set>_small_information.json beside the runs, and a markdown table in task1_segments_<data set>.md.

    python benchmarks/task1_segments.py --dataset logs_id_heavy --tables organisers tuned --seeds 0 1
    python benchmarks/task1_segments.py --dataset logs_id_heavy --report
    python benchmarks/task1_segments.py --dataset logs --information
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
from qin.embed.tune import HistoryPairs, TuneSettings, read_histories, tune_on_histories  # noqa: E402
from qin.embed.vectors import l2_normalise, pca_reduce  # noqa: E402
from qin.features.raw import ITEM_EMB  # noqa: E402
from qin.metrics import auc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "task1_segments"
BASE_TABLES = ("organisers", "tuned", "tuned_dropout", "true_latents")
VARIANTS = ("tuned_pop", "tuned_content16", "tuned_content32", "tuned_coldknn", "tuned_coldzero",
            "tuned_dropout_centred", "tuned_w1w8")
SEGMENTS = ("all", "cold", "series_mate", "rest")


def table_vectors(path: Path) -> np.ndarray:
    """(N + 1, 128) float64 item_emb_d128 of an item table, row 0 = padding."""
    return np.stack(read_item_info(path)[ITEM_EMB].to_list()).astype(np.float64)


def tuned_with(settings: TuneSettings, content: Path, train: Path, out: Path) -> np.ndarray:
    """The vectors of a table tuned with `settings` (tuned into `out` on first use, then read back)."""
    if not out.is_file():
        tune_on_histories(content, train, out, settings, progress=False)
    return table_vectors(out)


def make_variant(variant: str, tuned: Path, dropout: Path, content: Path, train: Path, out: Path) -> Path:
    """Write a variant of the tuned table (see the module docstring) to `out` (rebuilt every run, in
    seconds, so it always follows the tables on disk; the feature folder is keyed by its content).
    dropout: the benchmark's tuned_dropout table."""
    vectors = table_vectors(tuned)
    tables = out.parent
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
    elif variant == "tuned_dropout_centred":
        table[:] = table_vectors(dropout)
        table[1:] = l2_normalise(table[1:] - table[warm].mean(axis=0))
    elif variant == "tuned_w1w8":
        for start, window in ((0, 1), (64, 8)):
            channel = tuned_with(TuneSettings(seed=0, dim=64, window=window), content, train,
                                 tables / f"tuned_w{window}_d64.parquet")
            table[:, start:start + 64] = channel / np.sqrt(2)
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
            dropout, _ = make_table("tuned_dropout", dataset, data_root, work / "tables")
            content, _ = make_table("organisers", dataset, data_root, work / "tables")
            out = work / "tables" / f"{table}.parquet"
            path = make_variant(table, tuned, dropout, content, raw / "train.parquet", out)
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


def ridge_r2(vectors: np.ndarray, target: np.ndarray, folds: int = 5, penalty: float = 1.0) -> float:
    """Cross-validated R^2 of a ridge regression (with intercept) of target (n, t) on vectors (n, D)."""
    x = np.concatenate([vectors, np.ones((vectors.shape[0], 1))], axis=1)
    fold = np.random.default_rng(0).permutation(x.shape[0]) % folds
    predicted = np.zeros_like(target)
    for f in range(folds):
        train, held = fold != f, fold == f
        gram = x[train].T @ x[train] + penalty * np.eye(x.shape[1])
        weights = np.linalg.solve(gram, x[train].T @ target[train])
        predicted[held] = x[held] @ weights
    return float(1 - ((target - predicted) ** 2).sum() / ((target - target.mean(axis=0)) ** 2).sum())


def series_hit(vectors: np.ndarray, series: np.ndarray) -> float:
    """Share of rows whose cosine nearest neighbour (another row) has the same series id."""
    unit = l2_normalise(vectors)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return float((series[similarity.argmax(axis=1)] == series).mean())


def oracle_context_taste(histories: np.ndarray, taste: np.ndarray, window: int) -> np.ndarray:
    """(N + 1, d) each item's mean, over its occurrences in the histories (H, L), of the mean true taste of
    the items at most `window` slots away in that history; items never in a history (or without a
    neighbour) get zeros."""
    compact = HistoryPairs(histories, window)  # its (H, L) items, left-aligned, and their lengths
    items, lengths = compact.items, compact.lengths
    total, count = np.zeros_like(taste), np.zeros(taste.shape[0])
    for position in range(items.shape[1]):
        rows = lengths > position
        ids = items[rows, position]
        mates, mate_count = np.zeros((ids.size, taste.shape[1])), np.zeros(ids.size)
        for offset in range(-window, window + 1):
            other = position + offset
            if offset == 0 or not 0 <= other < items.shape[1]:
                continue
            neighbour = items[rows, other]
            present = neighbour != 0
            mates[present] += taste[neighbour[present]]
            mate_count += present
        has = mate_count > 0
        np.add.at(total, ids[has], mates[has] / mate_count[has, None])
        np.add.at(count, ids[has], 1)
    return total / np.maximum(count, 1)[:, None]


def information(dataset: DataSet, console: Console) -> dict[str, Any]:
    """What the tables on disk hold of the hidden item truth, and the oracle-context yardstick (module
    docstring); written to <data set>_small_information.json."""
    data_root = draw(dataset, SIZE, console)
    raw = data_root / "MicroLens_1M_x1"
    truth = redraw_logs(dataset, raw / "item_info.parquet").items
    histories = read_histories(raw / "train.parquet")
    warm = np.zeros(truth.taste.shape[0], dtype=bool)
    warm[np.unique(histories)] = True
    warm[0] = False
    occurrences = np.bincount(histories.ravel(), minlength=warm.size)[warm]
    tables_dir = WORK / "task1" / f"{dataset.name}-{SIZE}" / "tables"
    tables = {"organisers": raw / "item_info.parquet"}
    tables.update({t: tables_dir / f"{t}.parquet" for t in BASE_TABLES[1:] + VARIANTS
                   if (tables_dir / f"{t}.parquet").is_file()})
    rows = []
    for name, path in tables.items():
        vectors = table_vectors(path)[warm]
        rows.append({"vectors": name, "taste_r2": ridge_r2(vectors, truth.taste[warm]),
                     "log_popularity_r2": ridge_r2(vectors, truth.pop_z[warm, None]),
                     "series_hit": series_hit(vectors, truth.series[warm])})
    for window in (1, 3, 5, histories.shape[1]):
        estimate = oracle_context_taste(histories, truth.taste, window)[warm]
        rows.append({"vectors": f"oracle_context_w{window}",
                     "taste_r2": ridge_r2(estimate, truth.taste[warm])})
    record = {"benchmark": "task1_information", "dataset": dataset.name, "size": SIZE,
              "warm_items": int(warm.sum()), "histories": int(histories.shape[0]),
              "occurrences_per_warm_item": {"median": float(np.median(occurrences)),
                                            "mean": float(occurrences.mean())}, "rows": rows}
    write_json(RESULTS / f"{dataset.name}_{SIZE}_information.json", record)
    return record


def information_report(dataset: DataSet) -> str:
    path = RESULTS / f"{dataset.name}_{SIZE}_information.json"
    if not path.is_file():
        return ""
    record = json.loads(path.read_text())
    lines = [f"What the vectors hold of the hidden truth ({record['warm_items']} warm items, a median of "
             f"{record['occurrences_per_warm_item']['median']:.0f} occurrences each in "
             f"{record['histories']} distinct training histories; cross-validated ridge R^2):", "",
             "| vectors | taste R^2 | log popularity R^2 | series nearest-neighbour hit |",
             "|---|---|---|---|"]
    for row in record["rows"]:
        extra = [f"{row[k]:.3f}" if k in row else "" for k in ("log_popularity_r2", "series_hit")]
        lines.append(f"| `{row['vectors']}` | {row['taste_r2']:.3f} | {extra[0]} | {extra[1]} |")
    return "\n".join(lines)


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
    parser.add_argument("--information", action="store_true",
                        help="measure what the tables on disk hold of the hidden truth instead of training")
    args = parser.parse_args()
    dataset = next(d for d in SUITE if d.name == args.dataset)
    if args.information:
        information(dataset, Console())
    elif not args.report:
        run(dataset, args.tables, args.seeds, args.threads, Console())
    table = "\n\n".join(t for t in (report(dataset) if (RESULTS / f"{dataset.name}_{SIZE}.json").is_file()
                                      else "", information_report(dataset)) if t)
    (RESULTS.parent / f"task1_segments_{dataset.name}.md").write_text(
        f"Task 1 on `{dataset.name}` (small): test AUC of the organisers' DIN by target segment, mean over "
        "the seeds shown; generated by `python benchmarks/task1_segments.py --report` (`--information` "
        "for the second table).\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
