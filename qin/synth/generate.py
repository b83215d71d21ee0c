"""Orchestration: `draw_synth` draws the truth and the rows in memory; `synthesize` checks the output folder,
`_build` runs every stage into a temporary folder (drawing the rows as `draw_synth` does), `_install` moves
it in."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qin.errors import QinError, os_error
from qin.layout import FILE_LIST_PATH, check_out_dir, install_outputs, make_temp_dir, present_outputs
from qin.synth.content import content_vectors, emb_variants, make_titles, pca, write_images
from qin.synth.items import Items, make_items
from qin.synth.metrics import expected_auc, realised_auc
from qin.synth.params import (
    CANDIDATES_PER_USER,
    DATA_SUBDIR,
    DEFAULT_PARAMS,
    EMB_DIM,
    HIDDEN_SUBDIR,
    IMAGES_SUBDIR,
    SIZES,
    SizeSpec,
    SynthParams,
    SynthSize,
    stream,
)
from qin.synth.rows import Rows, bisect_beta0, make_rows, sigmoid
from qin.synth.users import Users, make_users
from qin.synth.write import write_hidden, write_item_seq, write_items, write_split


@dataclass(frozen=True)
class SynthResult:
    """Where `synthesize` wrote: ``data_dir`` (= out_dir), ``hidden_dir``, and meta.json's content."""

    data_dir: Path
    hidden_dir: Path
    meta: dict


_TOOL = "synth"


def _check_out_dir(out_dir: Path) -> None:
    """Refuse paths we must not write to, before any work is done (see `qin.layout.check_out_dir`)."""
    check_out_dir(out_dir, _TOOL)


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs from tmp into out_dir, replacing an earlier run's (each move is a rename)."""
    install_outputs(tmp, out_dir, _TOOL)


def _split_users(spec: SizeSpec) -> list[np.ndarray]:
    """User index ranges of train, valid and test (disjoint), ceil(rows / 4) users each."""
    counts = [-(-r // CANDIDATES_PER_USER) for r in (spec.train_rows, spec.valid_rows, spec.test_rows)]
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [np.arange(bounds[i], bounds[i + 1]) for i in range(3)]


@dataclass(frozen=True)
class SynthDraw:
    """What one (size, seed, params) draws for the rows, before anything is written: the truth and the labels.

    Content (text/image vectors, embedding variants, titles, covers) and the missing titles/images are not
    part of it: `synthesize` draws them from their own random streams, so they never shift these numbers.
    """

    items: Items  # item truth, indexed by item id (row 0 = padding)
    users: Users  # user truth of all splits (train users first, then valid, then test)
    users_by_split: list[np.ndarray]  # user indices (into users) of train, valid, test
    rows: Rows  # every impression row of every split, in output order (rows.split: 0/1/2)
    rows_by_split: list[np.ndarray]  # row indices (into rows) of train, valid, test, in output order
    beta0: float  # the intercept: mean p_true over all rows = params.target_rate
    p_true: np.ndarray  # (n,) float64 true click probability sigmoid(rows.f_raw + beta0) of every row
    labels: np.ndarray  # (n,) float64 0/1 clicks drawn from p_true


def draw_synth(size: SynthSize, seed: int = 0, params: SynthParams = DEFAULT_PARAMS) -> SynthDraw:
    """Draw a data set's truth and rows in memory, stage by stage, each from its own random stream.

    These are exactly the rows and labels `synthesize` writes for the same (size, seed, params): it draws
    them by the same code (`make_items`, then `_draw_rows`). Analyses use it to take the click logit apart
    (benchmarks/signal_anatomy.py).

    Raises:
        QinError: an unknown size, or a seed that is not an integer ≥ 0.
    """
    size = _checked_size(size)
    _check_seed(seed)
    return _draw_rows(make_items(SIZES[size], params, seed, size), size, seed, params)


def _draw_rows(items: Items, size: SynthSize, seed: int, prm: SynthParams) -> SynthDraw:
    """`draw_synth` once the items are drawn (`_build` makes the content vectors in between)."""
    spec = SIZES[size]
    users_by_split = _split_users(spec)
    users = make_users(int(users_by_split[2][-1]) + 1, items, spec, prm, seed, size)
    rows = make_rows(spec, users, items, prm, seed, size, users_by_split)
    beta0 = bisect_beta0(rows.f_raw, prm.target_rate)
    p_true = sigmoid(rows.f_raw + beta0)
    labels = (stream(seed, size, "labels").random(p_true.size) < p_true).astype(np.float64)
    rows_by_split = [np.nonzero(rows.split == s)[0] for s in range(3)]
    return SynthDraw(items, users, users_by_split, rows, rows_by_split, beta0, p_true, labels)


def _checked_size(size: SynthSize | str) -> SynthSize:
    """size as a SynthSize; QinError naming the choices when it is none of them."""
    try:
        return SynthSize(size)
    except ValueError:
        raise QinError(f"synth: unknown size {size!r}; choose one of "
                       f"{', '.join(s.value for s in SynthSize)}") from None


def _check_seed(seed: object) -> None:
    """QinError unless seed is an integer ≥ 0."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise QinError(f"synth: seed must be an integer ≥ 0, got {seed!r}")


def synthesize(out_dir: Path, size: SynthSize, seed: int = 0, test_label: bool = False, images: bool = True,
               progress: bool = True, params: SynthParams = DEFAULT_PARAMS) -> SynthResult:
    """Generate a demo data set with the challenge's layout and a known best-possible AUC.

    Args:
        out_dir: folder that receives MicroLens_1M_x1/, item_*.parquet, item_images/ and hidden/. It must be
            new, empty, or written by an earlier `qin synth` (either generator; hidden/meta.json proves it,
            and hidden/files.txt lists every file under its entries): then that run's entries are replaced
            as a whole; other entries of the folder are left alone. A leading ~ is the home folder.
        size: tiny / small / bench / full (see SIZES).
        seed: any int ≥ 0; the same (seed, size) gives the same parquet content.
        test_label: also write a constant 0.0 `label` column into test.parquet.
        images: write item_images/<item_id>.jpg (32x32 covers). Skipping saves time for large sizes.
        progress: show a rich progress bar over the stages.
        params: the generator's parameters (DEFAULT_PARAMS: the tuned ones; `params_with` changes some).

    Returns:
        SynthResult(data_dir=out_dir, hidden_dir=out_dir/"hidden", meta=<the dict written to meta.json>).

    Raises:
        QinError: out_dir is a file, lies under a file, or holds entries (or files inside its entries) an
            earlier `qin synth` did not write (real data); seed < 0; or the system failed to write (a full
            disk, a read-only folder).
    """
    out_dir = Path(out_dir).expanduser()  # "~/x" quoted: pyarrow would expand it, Python would not
    return _synthesize(out_dir, _checked_size(size), seed, test_label, images, progress, params)


def _synthesize(out_dir: Path, size: SynthSize, seed: int, test_label: bool, images: bool, progress: bool,
                prm: SynthParams) -> SynthResult:
    """`synthesize` once size is a SynthSize: check the seed, build in a temporary folder, install."""
    _check_seed(seed)
    spec = SIZES[size]
    columns = (TextColumn("[bold]synth {task.fields[size]}[/] {task.description:<28}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    tmp: Path | None = None
    try:
        _check_out_dir(out_dir)
        tmp = make_temp_dir(out_dir)
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            meta = _build(tmp, spec, size, seed, test_label, images, prm, bar)
        _install(tmp, out_dir)
    except OSError as error:  # a full disk, a read-only folder: the user's to fix, in one line
        # pyarrow's and PIL's errors often name no file: then the output folder is named
        raise os_error(error, doing=f"writing the synthetic data set {out_dir}", path=out_dir) from error
    finally:
        if tmp is not None:  # also on KeyboardInterrupt: no half-written folder is left behind
            shutil.rmtree(tmp, ignore_errors=True)
    return SynthResult(data_dir=out_dir, hidden_dir=out_dir / HIDDEN_SUBDIR, meta=meta)


def _stages(bar: Progress, size: SynthSize, names: list[str]) -> Iterator[str]:
    """Yield stage names while advancing a stage bar."""
    task = bar.add_task("", total=len(names), size=size.value)
    for name in names:
        bar.update(task, description=name)
        yield name
        bar.advance(task)
    bar.update(task, description="done")


def _build(tmp: Path, spec: SizeSpec, size: SynthSize, seed: int, test_label: bool, images: bool,
           prm: SynthParams, bar: Progress) -> dict:
    """Generate everything into tmp; returns meta.json's dict.

    The rows are those of `draw_synth` (same items, then the same `_draw_rows`). The content vectors are
    made and freed between the two, before the rows exist: peak memory is the larger stage, not their sum.
    """
    names = ["items", "content vectors + PCA", "titles", "cover images", "users, candidates + labels",
             "train/valid/test", "item_seq", "truth + meta"]
    stage = _stages(bar, size, names)
    (tmp / DATA_SUBDIR).mkdir()
    (tmp / HIDDEN_SUBDIR).mkdir()

    next(stage)
    items = make_items(spec, prm, seed, size)
    n = spec.n_items
    rng_miss = stream(seed, size, "missing")
    empty_title = rng_miss.random(n) < prm.p_empty_title  # (N,) for items 1..N
    has_image = np.r_[False, rng_miss.random(n) >= prm.p_missing_image]  # (N+1,)

    next(stage)
    txt, img = content_vectors(items, prm, empty_title, seed, size)
    emb = pca((txt, img), EMB_DIM)
    variants = emb_variants(items, prm, seed, size)

    next(stage)
    titles = make_titles(items, spec.n_topics, empty_title, seed, size)
    write_items(tmp, items, titles, txt, img, emb, variants)
    del txt, img, emb, variants

    next(stage)
    if images:
        task = bar.add_task("images", total=int(has_image.sum()), size=size.value)
        write_images(items, tmp / IMAGES_SUBDIR, has_image, prm, seed, size,
                     lambda m: bar.advance(task, m))
        bar.remove_task(task)

    next(stage)
    drawn = _draw_rows(items, size, seed, prm)
    users, rows, split_users = drawn.users, drawn.rows, drawn.users_by_split
    beta0, p_true, y, split_idx = drawn.beta0, drawn.p_true, drawn.labels, drawn.rows_by_split

    next(stage)
    task = bar.add_task("rows", total=int(rows.user.size), size=size.value)
    for s, name in enumerate(("train", "valid", "test")):
        is_test = name == "test"
        labels = (np.zeros(split_idx[s].size) if test_label else None) if is_test else y[split_idx[s]]
        write_split(tmp / DATA_SUBDIR / f"{name}.parquet", split_idx[s], labels, is_test, rows, users, items,
                    spec, lambda m: bar.advance(task, m))
    bar.remove_task(task)

    next(stage)
    n_seq_rows = write_item_seq(tmp / "item_seq.parquet", users, prm)

    next(stage)
    tr, va, te = split_idx
    write_hidden(tmp / HIDDEN_SUBDIR, items, p_true[va], p_true[te], y[te])
    pop = items.log_pop[rows.item]
    meta = {
        "generator": "qin.synth",
        "size": size.value,
        "seed": seed,
        "size_spec": asdict(spec),
        "params": asdict(prm),
        "beta0": beta0,
        "rows": {"train": int(tr.size), "valid": int(va.size), "test": int(te.size), "item_seq": n_seq_rows},
        "users": {"train": int(split_users[0].size), "valid": int(split_users[1].size),
                  "test": int(split_users[2].size)},
        "items": n,
        "max_tag_id": int(items.tags.max()),
        "n_empty_titles": int(empty_title.sum()),
        "n_missing_images": int((~has_image[1:]).sum()),
        "images_written": bool(images),
        "outputs": present_outputs(tmp),  # the marker: what a later run may replace (qin.layout)
        "file_list": FILE_LIST_PATH,  # every file written under them (written by the install)
        "test_label": "const0" if test_label else "absent",
        "label_rate": {"train": float(y[tr].mean()), "valid": float(y[va].mean()),
                       "test": float(y[te].mean())},
        "mean_p_true": {"train": float(p_true[tr].mean()), "valid": float(p_true[va].mean()),
                        "test": float(p_true[te].mean())},
        "history_len": {"mean": float(users.hist_len.mean()), "median": float(np.median(users.hist_len))},
        "auc": {
            "oracle_valid": realised_auc(y[va], p_true[va]),
            "oracle_test": realised_auc(y[te], p_true[te]),
            "expected_oracle_valid": expected_auc(p_true[va]),
            "expected_oracle_test": expected_auc(p_true[te]),
            "popularity_valid": realised_auc(y[va], pop[va]),
            "popularity_test": realised_auc(y[te], pop[te]),
            "s_tag_valid": realised_auc(y[va], rows.s_tag[va]),
            "s_tag_test": realised_auc(y[te], rows.s_tag[te]),
            "s_att_test": realised_auc(y[te], rows.s_att[te]),
        },
        "notes": "hidden/ holds the truth; the solution must never read it. valid_truth.row = row in "
                 "valid.parquet; test_truth.ID = test.parquet ID. item_seq.parquet lists are unpadded.",
    }
    (tmp / HIDDEN_SUBDIR / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")
    for _ in stage:  # finish the bar
        pass
    return meta
