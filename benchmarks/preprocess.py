"""Benchmark `qin preprocess` (build_features): wall time, rows/s and peak memory.

    python benchmarks/preprocess.py --data data-bench/MicroLens_1M_x1
    python benchmarks/preprocess.py --generate --name fullshape \
        --data benchmarks/work/fullshape/MicroLens_1M_x1

The build runs in a child process with ``force=True``, so the peak resident memory
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is the build's own, not this script's or the
generator's. Pages of the output ``.npy`` memory maps written by the build count as resident
(file-backed, reclaimable) memory too, so this script also samples the child's anonymous memory
(``RssAnon`` in /proc/<pid>/status, every 50 ms) and reports its peak separately.

``--generate`` writes a full-size-shaped raw folder first (3.6M train rows, S=100 left-padded
histories with ~9 non-zero items, 10k valid, 379,142 test, 91,718 items with float64
embeddings) in 1M-row row groups, like pyarrow's default writer.

Writes ``benchmarks/results/preprocess_<name>.json`` and prints a markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
N_ITEMS = 91_718  # item_info rows of the real data (row 0 = padding)
N_TAGS = 11_739  # tag ids 0..11738


def _history_column(rng: np.random.Generator, n_rows: int, seq_len: int) -> pa.ListArray:
    """(n_rows,) fixed-length histories, left-padded, geometric lengths with mean ~9 (as MicroLens-1M)."""
    lengths = np.minimum(rng.geometric(1 / 9, n_rows), seq_len)  # (n,)
    seq = rng.integers(1, N_ITEMS, size=(n_rows, seq_len))  # (n, S)
    seq[np.arange(seq_len)[None, :] < (seq_len - lengths)[:, None]] = 0  # left padding
    offsets = pa.array(np.arange(0, n_rows * seq_len + 1, seq_len, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(seq.ravel()))


def _write_split(path: Path, rng: np.random.Generator, n_rows: int, seq_len: int, test: bool) -> None:
    """One split parquet file, written 1M rows (= one row group) at a time to bound memory."""
    writer = None
    for offset in range(0, n_rows, 1 << 20):
        n = min(1 << 20, n_rows - offset)
        columns: dict[str, pa.Array] = {}
        if test:
            columns["ID"] = pa.array(np.arange(offset, offset + n, dtype=np.int64))
        columns["user_id"] = pa.array(rng.integers(1, 1_000_000, n))
        columns["item_seq"] = _history_column(rng, n, seq_len)
        columns["item_id"] = pa.array(rng.integers(1, N_ITEMS, n))
        columns["likes_level"] = pa.array(rng.integers(0, 10, n))
        columns["views_level"] = pa.array(rng.integers(0, 10, n))
        if not test:
            columns["label"] = pa.array((rng.random(n) < 0.25).astype(np.float64))
        table = pa.table(columns)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def generate(raw_dir: Path, train_rows: int, seq_len: int, seed: int = 0) -> None:
    """Write a full-size-shaped raw folder (random ids: for timing, not for learning)."""
    rng = np.random.default_rng(seed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    _write_split(raw_dir / "train.parquet", rng, train_rows, seq_len, test=False)
    _write_split(raw_dir / "valid.parquet", rng, 10_000, seq_len, test=False)
    _write_split(raw_dir / "test.parquet", rng, 379_142, seq_len, test=True)
    tags = rng.integers(0, N_TAGS, (N_ITEMS, 5))  # (V, 5)
    emb = rng.standard_normal((N_ITEMS, 128))  # (V, 128) float64, as the organisers' file
    tags[0], emb[0] = 0, 0.0
    offsets = lambda width: pa.array(np.arange(0, N_ITEMS * width + 1, width, dtype=np.int32))  # noqa: E731
    table = pa.table(
        {
            "item_id": pa.array(np.arange(N_ITEMS, dtype=np.int64)),
            "item_tags": pa.ListArray.from_arrays(offsets(5), pa.array(tags.ravel())),
            "item_emb_d128": pa.ListArray.from_arrays(offsets(128), pa.array(emb.ravel())),
        }
    )
    pq.write_table(table, raw_dir / "item_info.parquet")


def _child(raw_dir: Path, out_dir: Path, max_len: int, chunk_rows: int, result_path: Path) -> None:
    """Runs in the child process: one forced build, its result written as JSON."""
    from qin.features import build_features, load_features

    result = build_features(raw_dir, out_dir, max_len, force=True, progress=True, chunk_rows=chunk_rows)
    manifest = load_features(result.feature_dir).manifest
    rows = {split: info["rows"] for split, info in manifest["splits"].items()}
    result_path.write_text(json.dumps({"seconds": result.seconds, "rows": rows}))


def _rss_anon_kib(pid: int) -> int:
    """Current anonymous resident memory of a process in KiB (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=ROOT / "data-bench" / "MicroLens_1M_x1", help="raw folder"
    )
    parser.add_argument("--name", default=None, help="result name (default: the data folder's name)")
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=500_000)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "work" / "features", help="features root"
    )
    parser.add_argument(
        "--generate", action="store_true", help="write a full-size-shaped raw folder at --data first"
    )
    parser.add_argument("--train-rows", type=int, default=3_600_000, help="with --generate")
    parser.add_argument("--seq-len", type=int, default=100, help="with --generate: stored history length S")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    name = args.name or args.data.name
    out_dir = args.out / f"{name}-L{args.max_len}"

    if args.child is not None:
        _child(args.data, out_dir, args.max_len, args.chunk_rows, args.child)
        return

    if args.generate:
        start = time.perf_counter()
        generate(args.data, args.train_rows, args.seq_len)
        print(f"generated {args.data} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if not (args.data / "train.parquet").is_file():
        sys.exit(f"{args.data}: no train.parquet (run `qin synth` or pass --generate)")

    child_json = args.out / f".{name}-bench.json"
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    command = [sys.executable, __file__, "--data", str(args.data), "--name", name]
    command += ["--out", str(args.out), "--max-len", str(args.max_len)]
    command += ["--chunk-rows", str(args.chunk_rows), "--child", str(child_json)]
    process = subprocess.Popen(command)
    peak_anon_kib = 0
    while process.poll() is None:
        peak_anon_kib = max(peak_anon_kib, _rss_anon_kib(process.pid))
        time.sleep(0.05)
    if process.returncode != 0:
        sys.exit(f"build failed with exit code {process.returncode}")
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the build child only (generation ran here)
    child = json.loads(child_json.read_text())
    child_json.unlink()

    total_rows = sum(child["rows"].values())
    result = {
        "name": name,
        "data": str(args.data.resolve()),
        "max_len": args.max_len,
        "chunk_rows": args.chunk_rows,
        "rows": child["rows"],
        "total_rows": total_rows,
        "input_bytes": sum(p.stat().st_size for p in args.data.glob("*.parquet")),
        "build_seconds": round(child["seconds"], 2),  # build_features itself (hashing included)
        "process_seconds": round(wall, 2),  # plus interpreter start and imports
        "rows_per_second": round(total_rows / child["seconds"]),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # Linux reports KiB; includes mapped output
        "peak_anon_rss_mib": round(peak_anon_kib / 1024),  # sampled; excludes file-backed pages
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "polars": pl.__version__,
            "numpy": np.__version__,
            "load_average_before": [round(x, 2) for x in load_before],  # shared machines are noisy
        },
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"preprocess_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    print(
        "| data | rows (train/valid/test) | max_len | build s | rows/s | CPU s "
        "| peak RSS MiB | peak anon MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = "/".join(f"{child['rows'][s]:,}" for s in ("train", "valid", "test"))
    print(
        f"| {name} | {rows} | {args.max_len} | {result['build_seconds']} | {result['rows_per_second']:,} "
        f"| {result['cpu_seconds']} | {result['peak_rss_mib']:,} | {result['peak_anon_rss_mib']:,} |"
    )


if __name__ == "__main__":
    main()
