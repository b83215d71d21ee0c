"""Orchestration: `synthesize` checks the output folder, `_build` runs every stage, `_install` moves it in."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qin.errors import QinError, os_error
from qin.layout import FILE_LIST_PATH, check_out_dir, install_outputs, make_temp_dir, present_outputs
from qin.synth.content import _content_vectors, _emb_variants, _pca, _titles, _write_images
from qin.synth.items import _make_items
from qin.synth.metrics import _auc, expected_auc
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
    _rng,
)
from qin.synth.rows import _bisect_beta0, _make_rows, _sigmoid
from qin.synth.users import _make_users
from qin.synth.write import _write_hidden, _write_item_seq, _write_items, _write_split


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


def synthesize(out_dir: Path, size: SynthSize, seed: int = 0, test_label: bool = False, images: bool = True,
               progress: bool = True, params: SynthParams = DEFAULT_PARAMS) -> SynthResult:
    """Generate a demo data set with the challenge's layout and a known best-possible AUC.

    Args:
        out_dir: folder that receives MicroLens_1M_x1/, item_*.parquet, item_images/ and hidden/. It must be
            new, empty, or written by an earlier `qin synth` (either generator; hidden/meta.json proves it,
            and hidden/files.txt lists every file under its entries): then that run's entries are replaced
            as a whole; other entries of the folder are left alone.
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
    try:
        size = SynthSize(size)
    except ValueError:
        raise QinError(f"synth: unknown size {size!r}; choose one of "
                       f"{', '.join(s.value for s in SynthSize)}") from None
    return _synthesize(Path(out_dir), size, seed, test_label, images, progress, params)


def _synthesize(out_dir: Path, size: SynthSize, seed: int, test_label: bool, images: bool, progress: bool,
                prm: SynthParams) -> SynthResult:
    """`synthesize` with explicit parameters (used for tuning)."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise QinError(f"synth: seed must be an integer ≥ 0, got {seed!r}")
    spec = SIZES[size]
    columns = (TextColumn("[bold]synth {task.fields[size]}[/] {task.description:<28}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    tmp: Path | None = None
    try:
        _check_out_dir(out_dir)
        tmp = make_temp_dir(out_dir)
        with Progress(*columns, disable=not progress) as bar:
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
    """Generate everything into tmp; returns meta.json's dict."""
    names = ["items", "content vectors + PCA", "titles", "cover images", "users + histories",
             "candidates + labels", "train/valid/test", "item_seq", "truth + meta"]
    stage = _stages(bar, size, names)
    (tmp / DATA_SUBDIR).mkdir()
    (tmp / HIDDEN_SUBDIR).mkdir()

    next(stage)
    items = _make_items(spec, prm, seed, size)
    n = spec.n_items
    rng_miss = _rng(seed, size, "missing")
    empty_title = rng_miss.random(n) < prm.p_empty_title  # (N,) for items 1..N
    has_image = np.r_[False, rng_miss.random(n) >= prm.p_missing_image]  # (N+1,)

    next(stage)
    txt, img = _content_vectors(items, prm, empty_title, seed, size)
    emb = _pca((txt, img), EMB_DIM)
    variants = _emb_variants(items, prm, seed, size)

    next(stage)
    titles = _titles(items, spec.n_topics, empty_title, seed, size)
    _write_items(tmp, items, titles, txt, img, emb, variants)
    del txt, img, emb, variants

    next(stage)
    if images:
        task = bar.add_task("images", total=int(has_image.sum()), size=size.value)
        _write_images(items, tmp / IMAGES_SUBDIR, has_image, prm, seed, size,
                      lambda m: bar.advance(task, m))
        bar.remove_task(task)

    next(stage)
    split_users = _split_users(spec)
    users = _make_users(int(split_users[2][-1]) + 1, items, spec, prm, seed, size)

    next(stage)
    rows = _make_rows(spec, users, items, prm, seed, size, split_users)
    beta0 = _bisect_beta0(rows.f_raw, prm.target_rate)
    p_true = _sigmoid(rows.f_raw + beta0)
    y = (_rng(seed, size, "labels").random(p_true.size) < p_true).astype(np.float64)

    next(stage)
    task = bar.add_task("rows", total=int(rows.user.size), size=size.value)
    split_idx = [np.nonzero(rows.split == s)[0] for s in range(3)]
    for s, name in enumerate(("train", "valid", "test")):
        is_test = name == "test"
        labels = (np.zeros(split_idx[s].size) if test_label else None) if is_test else y[split_idx[s]]
        _write_split(tmp / DATA_SUBDIR / f"{name}.parquet", split_idx[s], labels, is_test, rows, users, items,
                     spec, lambda m: bar.advance(task, m))
    bar.remove_task(task)

    next(stage)
    n_seq_rows = _write_item_seq(tmp / "item_seq.parquet", users, prm)

    next(stage)
    tr, va, te = split_idx
    _write_hidden(tmp / HIDDEN_SUBDIR, items, p_true[va], p_true[te], y[te])
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
            "oracle_valid": _auc(y[va], p_true[va]),
            "oracle_test": _auc(y[te], p_true[te]),
            "expected_oracle_valid": expected_auc(p_true[va]),
            "expected_oracle_test": expected_auc(p_true[te]),
            "popularity_valid": _auc(y[va], pop[va]),
            "popularity_test": _auc(y[te], pop[te]),
            "s_tag_valid": _auc(y[va], rows.s_tag[va]),
            "s_tag_test": _auc(y[te], rows.s_tag[te]),
            "s_att_test": _auc(y[te], rows.s_att[te]),
        },
        "notes": "hidden/ holds the truth; the solution must never read it. valid_truth.row = row in "
                 "valid.parquet; test_truth.ID = test.parquet ID. item_seq.parquet lists are unpadded.",
    }
    (tmp / HIDDEN_SUBDIR / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=True) + "\n")
    for _ in stage:  # finish the bar
        pass
    return meta
