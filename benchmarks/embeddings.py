"""Embedding table: QIN validation AUC with four different item tables (item_emb_d128) on generated data.

Same data, same model and budget (`configs/budget.yaml`: QIN's math at embedding 32); only the item table
changes:

* generated: the data's own item_info.parquet (the generator's item_emb_d128).
* precomputed: `qin.embed.embed_from_precomputed`, the organisers' recipe (txt_emb_BERT ++
  img_emb_CLIPRN50, PCA 128).
* content_text: `qin.embed.embed_from_content` with the bundled all-MiniLM-L6-v2 on the titles and no
  image model (text only: there is no local image model on the machine this was written for).
* zeros: item_info.parquet with every item_emb_d128 set to 128 zeros (no multimodal signal at all).

Each variant gets its own feature folder (`data.item_info` override) and run folder; the validation AUC is
the best checkpoint's, and the oracle AUC is the generator's p_true on the same rows. Writes
benchmarks/results/embeddings_<size><tag>.json (rewritten after every variant) and prints a markdown table.

    python benchmarks/embeddings.py [--size small] [--variants generated precomputed content_text zeros]
                                    [--set train.epochs=8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
from rich.console import Console

from qin.config import Config
from qin.embed import embed_from_content, embed_from_precomputed
from qin.evaluation import evaluate_run
from qin.features.folder import feature_dir_for
from qin.features.io import load_features
from qin.features.pipeline import build_features
from qin.features.raw import ITEM_EMB
from qin.predict import load_run
from qin.synth import SynthSize, synthesize
from qin.train import fit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("generated", "precomputed", "content_text", "zeros")
DESCRIPTIONS = {
    "generated": "item_info.parquet as generated",
    "precomputed": "organisers' recipe: BERT ++ CLIP-RN50, PCA 128",
    "content_text": "titles through all-MiniLM-L6-v2 (text only, no image model), PCA 128",
    "zeros": "all-zero item_emb_d128 (no multimodal vector)",
}


def data_folder(size: str, shared: Path, own: Path) -> Path:
    """The generated data set: the shared benchmarks/work/data-<size> if complete (read-only),
    else our own."""
    if (shared / "hidden" / "meta.json").is_file():
        return shared
    if not (own / "hidden" / "meta.json").is_file():
        synthesize(own, SynthSize(size), seed=0)
    return own


def zeros_table(item_info: Path, out: Path) -> None:
    """item_info with every item_emb_d128 replaced by zeros of the same length and element type."""
    info = pl.read_parquet(item_info)
    dtype = info.schema[ITEM_EMB]
    width = int(info[ITEM_EMB].list.len()[0])
    zeros = pl.Series(ITEM_EMB, np.zeros((info.height, width), dtype=np.float64)).cast(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    info.with_columns(zeros).write_parquet(out)


def make_table(variant: str, data_root: Path, emb_dir: Path) -> tuple[Path, float | None, dict]:
    """Write (or pick) the variant's item table: (path, PCA explained variance or None, extra facts)."""
    raw = data_root / "MicroLens_1M_x1"
    item_info, item_feature = raw / "item_info.parquet", data_root / "item_feature.parquet"
    if variant == "generated":
        return item_info, None, {}
    out = emb_dir / "tables" / f"{variant}.parquet"
    if variant == "precomputed":
        result = embed_from_precomputed(item_feature, item_info, out)
        return out, result.explained_variance, {}
    if variant == "content_text":
        result = embed_from_content(item_feature, item_info, images_dir=None, out=out, image_model=None,
                                    cache_dir=emb_dir / "embed_cache", progress=False)
        return out, result.explained_variance, {"missing_titles": result.missing_titles,
                                                 "images": "not used (no local image model)"}
    if variant == "zeros":
        zeros_table(item_info, out)
        return out, None, {}
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--config", default=str(ROOT / "configs" / "budget.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / "work"),
                        help="data-<size> here is reused when complete; everything else goes to <work>/emb")
    parser.add_argument("--tag", default="", help="suffix of the results file and run folders")
    args = parser.parse_args()
    console = Console()
    work = Path(args.work)
    emb_dir = work / "emb"
    data_root = data_folder(args.size, work / f"data-{args.size}", emb_dir / f"data-{args.size}")
    meta = json.loads((data_root / "hidden" / "meta.json").read_text())
    raw_dir = data_root / "MicroLens_1M_x1"
    common = [f"data.raw_dir={raw_dir}", f"data.features_root={emb_dir / 'features'}",
              f"train.run_root={emb_dir / 'runs'}", *args.overrides]
    out_path = RESULTS / f"embeddings_{args.size}{args.tag}.json"
    rows = []
    for variant in args.variants:
        started = time.perf_counter()
        table, explained, extra = make_table(variant, data_root, emb_dir)
        embed_seconds = time.perf_counter() - started
        override = [] if variant == "generated" else [f"data.item_info={table}"]
        cfg = Config.from_yaml(args.config, [*common, *override])
        item_info = Path(cfg.data.item_info) if cfg.data.item_info else None
        built = build_features(
            raw_dir, feature_dir_for(Path(cfg.data.features_root), raw_dir, cfg.data.max_len, item_info),
            cfg.data.max_len, item_info=item_info)
        features = load_features(built.feature_dir)
        run_dir = emb_dir / "runs" / f"emb-{args.size}{args.tag}-{variant}"
        train_started = time.perf_counter()
        result = fit(cfg, features, run_dir, console=console, progress=False)
        evaluation = evaluate_run(load_run(run_dir), data_root / "hidden")
        row = {"variant": variant, "description": DESCRIPTIONS[variant], "item_table": str(table),
               "pca_explained_variance": explained, "valid_auc": evaluation["auc"],
               "oracle_auc": evaluation["oracle_auc"], "valid_logloss": evaluation["logloss"],
               "best_epoch": getattr(result, "best_epoch", None),
               "epochs_run": getattr(result, "epochs_run", None),
               "embed_seconds": round(embed_seconds, 1),
               "train_eval_seconds": round(time.perf_counter() - train_started, 1),
               "seconds": round(time.perf_counter() - started, 1), **extra}
        rows.append(row)
        console.print(row)
        record = {"benchmark": "embeddings", "size": args.size, "data": str(data_root),
                  "config": cfg.replace("data", item_info=None).to_dict(), "rows": rows,
                  "generator_auc": meta.get("auc")}
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(record, indent=2, default=str))
    popularity = (meta.get("auc") or {}).get("popularity_valid")
    print(f"data {data_root}, {cfg.train.epochs} epochs, mm_normalize={cfg.data.mm_normalize.value}"
          + (f", popularity alone {popularity:.4f}" if popularity is not None else ""))
    print("| item table | PCA explained variance | valid AUC | oracle AUC | % of oracle | seconds |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        explained = "-" if row["pca_explained_variance"] is None else f"{row['pca_explained_variance']:.3f}"
        print(f"| {row['variant']}: {row['description']} | {explained} | {row['valid_auc']:.4f} | "
              f"{row['oracle_auc']:.4f} | {100 * row['valid_auc'] / row['oracle_auc']:.1f}% | "
              f"{row['seconds']} |")


if __name__ == "__main__":
    main()
