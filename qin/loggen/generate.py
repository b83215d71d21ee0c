"""`generate_logs`: check the output folder, draw every stage into a temporary folder, then rename it in."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qin.errors import QinError, os_error
from qin.layout import FILE_LIST_PATH, make_temp_dir
from qin.loggen.items import ItemTruth, genre_centres, item_embedding, make_items
from qin.loggen.params import DEFAULT_LOG_PARAMS, LOG_SIZES, LogParams, LogSize, LogSizeSpec, stream
from qin.loggen.rows import SOURCES, Rows, calibrate_intercept, click_probability, make_rows, split_users
from qin.loggen.timelines import Timelines, make_timelines
from qin.loggen.write import (
    DATA_SUBDIR,
    GENERATOR_NAME,
    HIDDEN_SUBDIR,
    OUTPUTS,
    check_out_dir,
    install,
    write_hidden,
    write_item_info,
    write_split,
)
from qin.synth.metrics import expected_auc, realised_auc

EMB_DIM = 128  # item_emb_d128


def generate_logs(out_dir: Path, size: LogSize, seed: int = 0, params: LogParams = DEFAULT_LOG_PARAMS,
                  progress: bool = False) -> dict:
    """Write a log-like data set in the challenge's layout with its hidden truth; returns meta.json's dict.

    Args:
        out_dir: receives MicroLens_1M_x1/ and hidden/; must be new, empty, or written by an earlier
            `qin synth` (either generator; hidden/meta.json proves it, hidden/files.txt lists every file
            under its outputs), whose outputs are then replaced; other entries of the folder are left alone.
            A leading ~ is the home folder.
        size: tiny / small / bench (see LOG_SIZES).
        seed: any int ≥ 0; the same (seed, size, params) gives the same parquet content.
        params: generator knobs (see `log_params_with`).
        progress: print each stage with its elapsed time on stderr.

    Raises:
        QinError: an unknown size, a negative seed, an out_dir that is a file or holds entries (or files
            inside them) an earlier `qin synth` did not write, or a failed write (a full disk, a read-only
            folder).
    """
    try:
        size = LogSize(size)
    except ValueError:
        raise QinError(f"loggen: unknown size {size!r}; choose one of "
                       f"{', '.join(s.value for s in LogSize)}") from None
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise QinError(f"loggen: seed must be an integer ≥ 0, got {seed!r}")
    out_dir = Path(out_dir).expanduser()  # "~/x" quoted: pyarrow would expand it, Python would not
    tmp: Path | None = None
    try:
        check_out_dir(out_dir)
        tmp = make_temp_dir(out_dir)
        meta = _build(tmp, LOG_SIZES[size], size, int(seed), params, progress)
        install(tmp, out_dir)
    except OSError as error:  # a full disk, a read-only folder: the user's to fix, in one line
        # pyarrow's errors often name no file: then the output folder is named
        raise os_error(error, doing=f"writing the synthetic data set {out_dir}", path=out_dir) from error
    finally:
        if tmp is not None:  # also on KeyboardInterrupt: no half-written folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


@dataclass(frozen=True)
class LogDraw:
    """Everything one (size, seed, params) draws, before anything is written: the truth and the rows."""

    items: ItemTruth
    item_emb: np.ndarray  # (N+1, 128) the item_emb_d128 a model sees; row 0 = 0
    timelines: Timelines
    users_by_split: list[np.ndarray]  # user indices of train, valid, test
    rows: Rows
    intercept: float
    p_true: np.ndarray  # (n,) click probability of every row
    labels: np.ndarray  # (n,) float64 0/1 drawn from p_true


def draw_logs(size: LogSize, seed: int = 0, params: LogParams = DEFAULT_LOG_PARAMS) -> LogDraw:
    """Draw a data set in memory, stage by stage, each from its own random stream (what generate_logs writes;
    analyses use it to take the click logit apart)."""
    spec, prm = LOG_SIZES[LogSize(size)], params
    centres = genre_centres(spec.n_genres, prm.d_taste, stream(seed, size, "genres"))
    items = make_items(spec, prm, centres, stream(seed, size, "items"))
    item_emb = item_embedding(items, prm, EMB_DIM, stream(seed, size, "content"))
    row_counts = [spec.train_rows, spec.valid_rows, spec.test_rows]
    users_by_split = split_users(row_counts, prm.rows_per_user)
    n_users = int(users_by_split[2][-1]) + 1
    timelines = make_timelines(n_users, spec.seq_len, items, centres, prm, stream(seed, size, "timelines"))
    rows = make_rows(users_by_split, row_counts, timelines, items, prm, stream(seed, size, "candidates"))
    intercept = calibrate_intercept(rows.logit, prm.label_eps, prm.target_rate)
    p_true = click_probability(rows.logit, intercept, prm.label_eps)
    labels = (stream(seed, size, "labels").random(p_true.size) < p_true).astype(np.float64)
    return LogDraw(items, item_emb, timelines, users_by_split, rows, intercept, p_true, labels)


def _build(tmp: Path, spec: LogSizeSpec, size: LogSize, seed: int, prm: LogParams, progress: bool) -> dict:
    """Generate everything into tmp/{MicroLens_1M_x1,hidden}; returns meta.json's dict."""
    started = time.perf_counter()

    def stage(name: str) -> None:
        if progress:
            print(f"loggen {size.value}: {name} ({time.perf_counter() - started:.1f} s)", file=sys.stderr)

    (tmp / DATA_SUBDIR).mkdir()
    (tmp / HIDDEN_SUBDIR).mkdir()
    stage("draw: items, users + histories, candidates + labels")
    drawn = draw_logs(size, seed, prm)
    items, timelines, rows, users_by_split = drawn.items, drawn.timelines, drawn.rows, drawn.users_by_split
    intercept, p_true, y = drawn.intercept, drawn.p_true, drawn.labels
    write_item_info(tmp / DATA_SUBDIR / "item_info.parquet", items, drawn.item_emb)

    stage("train/valid/test")
    idx = [np.nonzero(rows.split == s)[0] for s in range(3)]
    for s, name in enumerate(("train", "valid", "test")):
        labels = None if name == "test" else y[idx[s]]
        write_split(tmp / DATA_SUBDIR / f"{name}.parquet", idx[s], labels, name == "test", rows, timelines,
                    items, spec.seq_len, spec.chunk_rows)

    stage("truth + meta")
    tr, va, te = idx
    split_names = ("train", "valid", "test")
    lengths = timelines.hist_len
    pop = items.log_pop[rows.item]
    # Items seen in train (as a target or in a train history; train users come first in hist_item).
    train_items = np.zeros(spec.n_items + 1, dtype=bool)
    train_items[rows.item[tr]] = True
    train_items[timelines.hist_item[: int(timelines.hist_len[users_by_split[0]].sum())]] = True
    meta = {
        "generator": GENERATOR_NAME,
        "size": size.value,
        "seed": seed,
        "size_spec": asdict(spec),
        "params": asdict(prm),
        "beta0": intercept,
        "rows": {"train": int(tr.size), "valid": int(va.size), "test": int(te.size)},
        "users": {name: int(us.size) for name, us in zip(split_names, users_by_split, strict=True)},
        "items": spec.n_items,
        "max_tag_id": int(items.tags.max()),
        "images_written": False,
        "outputs": list(OUTPUTS),  # the marker: what a later run may replace (qin.layout)
        "file_list": FILE_LIST_PATH,  # every file written under them (written by the install)
        "test_label": "absent",
        "label_mean": float(y[np.concatenate([tr, va])].mean()),
        "label_rate": {name: float(y[i].mean()) for name, i in zip(split_names, idx, strict=True)},
        "mean_p_true": {name: float(p_true[i].mean()) for name, i in zip(split_names, idx, strict=True)},
        "history_len": {"mean": float(lengths.mean()), "median": float(np.median(lengths)),
                        "share_1_2": float((lengths <= 2).mean()), "max": int(lengths.max())},
        "cold": {"items": int(items.cold[1:].sum()),
                 "items_unseen_in_train": int((~train_items[1:]).sum()),
                 "valid_targets_unseen_in_train": float((~train_items[rows.item[va]]).mean()),
                 "test_targets_unseen_in_train": float((~train_items[rows.item[te]]).mean())},
        "candidate_sources": {name: float((rows.source == k).mean()) for k, name in enumerate(SOURCES)},
        "series_hit_share": float((rows.series_hits > 0).mean()),
        "auc": {
            "oracle_valid": realised_auc(y[va], p_true[va]),
            "oracle_test": realised_auc(y[te], p_true[te]),
            "expected_oracle_valid": expected_auc(p_true[va]),
            "expected_oracle_test": expected_auc(p_true[te]),
            "popularity_valid": realised_auc(y[va], pop[va]),
            "popularity_test": realised_auc(y[te], pop[te]),
            "match_valid": realised_auc(y[va], rows.match[va]),
            "series_hits_valid": realised_auc(y[va], rows.series_hits[va]),
        },
        "notes": "hidden/ holds the truth; the solution must never read it. valid_truth.row = row in "
                 "valid.parquet; test_truth.ID = test.parquet ID. Written by qin.loggen (log-like process).",
    }
    write_hidden(tmp / HIDDEN_SUBDIR, p_true[va], p_true[te], y[te], meta)
    stage("done")
    return meta
