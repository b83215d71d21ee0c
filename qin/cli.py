"""The `qin` command: each subcommand parses its options and calls one library function."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qin.config import Config, DeviceChoice
from qin.errors import QinError, os_error

if TYPE_CHECKING:
    from qin.predict import LoadedRun  # imported where used: `qin --help` stays fast

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="QIN for multimodal CTR prediction: synth -> preprocess -> train -> predict.")
console = Console(stderr=True)  # status lines and progress bars: stderr, silenced by `qin --quiet`
error_console = Console(stderr=True)  # `error:` lines, never silenced
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]


def _version(show: bool) -> None:
    if show:
        from qin import __version__

        print(f"qin {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or status lines (errors and "
                                                              "--json output still print).")] = False,
) -> None:
    """QIN for multimodal CTR prediction: synth -> preprocess -> train -> predict."""
    console.quiet = quiet


def _progress(requested: bool = True) -> bool:
    """Whether a command shows progress: asked for, and `qin --quiet` not given."""
    return requested and not console.quiet

ConfigOption = Annotated[list[Path] | None, typer.Option(
    "--config", "-c", help="YAML config (default qin.yaml; qin.yaml and configs/*.yaml fall back to the "
                           "copies installed with qin). Repeat to layer: each later file sets the keys "
                           "written in it, e.g. -c configs/din.yaml -c configs/budget.yaml.")]
SetOption = Annotated[list[str] | None,
                      typer.Option("--set", help="Override, e.g. --set train.learning_rate=1e-3.")]
RunOption = Annotated[Path | None, typer.Option("--run", help="Run folder (default: newest under runs/).")]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _user_errors(command: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn QinError, and OSErrors a user fixes outside qin (a full disk, a read-only folder, a file
    where a folder should be), into one `error:` line and exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return command(*args, **kwargs)
        except QinError as error:
            _say_error(str(error))
        except OSError as error:
            _say_error(str(os_error(error)))
        except KeyboardInterrupt:
            # Every writer cleans up its temporary files on the way out; nothing else to say.
            error_console.print("interrupted (Ctrl-C): outputs are as they were, or complete")
            raise typer.Exit(code=130) from None

    return wrapper


def _say_error(message: str) -> NoReturn:
    error_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2) from None


def _load_config(config: list[Path] | None, overrides: list[str] | None,
                 default: Path = Path("qin.yaml")) -> Config:
    from qin.packaged import config_path

    return Config.from_yaml([config_path(path) for path in config or [default]], overrides or [])


def _run_dir_or_latest(run: Path | None, config: Config | None = None) -> Path:
    from qin.runs import latest_run_dir

    if run is not None:
        return run
    chosen = latest_run_dir(Path(config.train.run_root if config else "runs"))
    console.print(f"run: {chosen} (the newest finished run; choose another with --run)", highlight=False)
    return chosen


def _say_warnings(loaded: LoadedRun) -> None:
    for warning in loaded.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)


class SizeChoice(str, Enum):  # noqa: UP042 - the (str, Enum) form is what typer lists as choices
    """Data-set sizes of `qin synth` (the log-like process has no `full`)."""

    tiny = "tiny"
    small = "small"
    bench = "bench"
    full = "full"


class DemoSize(str, Enum):  # noqa: UP042
    """Sizes `qin demo` runs end to end in minutes on a CPU."""

    tiny = "tiny"
    small = "small"


class PredictSplit(str, Enum):  # noqa: UP042
    test = "test"  # the submission
    valid = "valid"  # per-row validation predictions


class SubmissionColumn(str, Enum):  # noqa: UP042
    """The leaderboard column a submission is scored in (docs/data.md section 3)."""

    task1 = "Task1"
    task2 = "Task2"
    task1_and_2 = "Task1&2"


class EmbedSource(str, Enum):  # noqa: UP042
    precomputed = "precomputed"  # the organisers' BERT + CLIP vectors in item_feature.parquet
    content = "content"  # encode titles and covers with local models


class TuneChoice(str, Enum):  # noqa: UP042 - the (str, Enum) form is what typer lists as choices
    none = "none"  # the table of --from as it is
    histories = "histories"  # tune a content table on the training histories (qin.embed.tune)


class FusionChoice(str, Enum):  # noqa: UP042 - mirrors qin.embed.Fusion without importing it at start-up
    concat = "concat"
    mean = "mean"


class SynthProcess(str, Enum):  # noqa: UP042 - the (str, Enum) form is what typer lists as choices
    """Which generator `qin synth` runs."""

    demo = "demo"  # qin.synth: the demo process (images, item_feature.parquet, ...)
    logs = "logs"  # qin.loggen: a log-like process (long tail, cold items, series, drifting interests)


@app.command()
@_user_errors
def synth(
    size: Annotated[SizeChoice, typer.Option(help="Data-set size (--process logs: not full).")]
    = SizeChoice.small,
    out: Annotated[Path, typer.Option(help="Output folder (data set + hidden/ truth).")] = Path("data/demo"),
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same data.")] = 0,
    test_label: Annotated[bool, typer.Option(help="Give test.parquet a constant 0 label column.")] = False,
    images: Annotated[bool, typer.Option(help="Write small cover images.")] = True,
    process: Annotated[SynthProcess, typer.Option(help="demo: qin.synth's process; logs: the log-like one "
                                                       "(no images, no item_feature.parquet).")]
    = SynthProcess.demo,
) -> None:
    """Generate a demo data set with the challenge's layout and a known oracle AUC.

    The outputs of an earlier `qin synth` in --out are replaced whole (MicroLens_1M_x1/, hidden/, ...);
    other files there are kept, and a folder holding files qin synth did not write is refused.
    """
    if process is SynthProcess.logs:
        _synth_logs(size.value, out, seed, test_label)
        return
    from qin.synth import SynthSize, synthesize

    chosen = SynthSize(size.value)
    result = synthesize(out, chosen, seed=seed, test_label=test_label, images=images)
    meta = result.meta
    console.print(f"wrote {result.data_dir} (truth in {result.hidden_dir})")
    console.print(f"oracle AUC (valid) {meta['auc']['oracle_valid']:.4f}; popularity alone "
                  f"{meta['auc']['popularity_valid']:.4f}")


def _synth_logs(size: str, out: Path, seed: int, test_label: bool) -> None:
    """`qin synth --process logs`: the log-like generator, same files and the same two lines."""
    from qin.loggen import LogSize, generate_logs

    try:
        chosen = LogSize(size)
    except ValueError:
        raise QinError(f"--process logs: --size must be one of {', '.join(s.value for s in LogSize)}; "
                       f"got {size!r}") from None
    if test_label:
        raise QinError("--process logs writes test.parquet without a label column; drop --test-label")
    meta = generate_logs(out, chosen, seed=seed)
    console.print(f"wrote {out} (truth in {out / 'hidden'})")
    console.print(f"oracle AUC (valid) {meta['auc']['oracle_valid']:.4f}; popularity alone "
                  f"{meta['auc']['popularity_valid']:.4f}")


@app.command()
@_user_errors
def preprocess(
    config: ConfigOption = None,
    overrides: SetOption = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when the features are up to date.")] = False,
) -> None:
    """Raw parquet files -> model-ready arrays under features/ (a no-op when up to date)."""
    from qin.features.pipeline import build_features_for

    result = build_features_for(_load_config(config, overrides).data, force=force, progress=_progress())
    state = "rebuilt" if result.rebuilt else "up to date"
    console.print(f"features {state}: {result.feature_dir} ({result.seconds:.1f} s)")


@app.command()
@_user_errors
def train(
    config: ConfigOption = None,
    overrides: SetOption = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<model>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the interrupted run in this folder.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the earlier run in --run-dir (its checkpoints "
                                                 "and metrics are deleted).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: JsonOption = False,
) -> None:
    """Train, early-stop on validation AUC, keep the best checkpoint (runs/<name>/best.pt)."""
    from qin.train import train_command

    result = train_command(config, overrides or [], run_dir, resume, overwrite, _progress(progress), console)
    if result is None:
        return
    console.print(f"best valid AUC {result.valid_auc:.5f} (epoch {result.best_epoch}); "
                  f"checkpoint {result.run_dir / 'best.pt'}")
    if as_json:
        print(json.dumps({"run_dir": str(result.run_dir), "valid_auc": result.valid_auc,
                          "valid_logloss": result.valid_logloss, "best_epoch": result.best_epoch,
                          "best_step": result.best_step, "steps": result.steps,
                          "stopped_early": result.stopped_early, "train_seconds": result.train_seconds}))


@app.command()
@_user_errors
def predict(
    out: Annotated[Path | None, typer.Option(help="Output file (default: submissions/<run>_<auc>.csv).")]
    = None,
    run: RunOption = None,
    split: Annotated[PredictSplit, typer.Option(help="test: the submission; valid: per-row predictions.")]
    = PredictSplit.test,
    column: Annotated[SubmissionColumn, typer.Option(help="Submission column.")] = SubmissionColumn.task2,
    make_zip: Annotated[bool, typer.Option("--zip", help="Also write <out>.zip with prediction.csv.")]
    = False,
    features: Annotated[Path | None, typer.Option(help="Feature folder (default: the one trained on).")]
    = None,
    device: Annotated[DeviceChoice | None, typer.Option(help="Device (default: the run's).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write the challenge submission (ID,Task2), validated; or per-row validation predictions."""
    from qin.predict import check_frame_output, load_run, validation_predictions, write_frame
    from qin.submission import submission_paths, write_submission

    # Output paths are checked before the model is loaded: a refused --out costs no scoring time.
    if out is not None:
        check_frame_output(out) if split is PredictSplit.valid else submission_paths(out, make_zip)
    loaded = load_run(_run_dir_or_latest(run), feature_dir=features,
                      device=device.value if device is not None else None)
    _say_warnings(loaded)
    if split is PredictSplit.valid:
        target = out or loaded.run_dir / "valid_predictions.parquet"
        write_frame(validation_predictions(loaded), target)
        console.print(f"wrote per-row validation predictions: {target}")
        print(json.dumps({"predictions": str(target)}) if as_json else target)
        return
    if out is None:
        valid_auc = loaded.checkpoint.get("valid_auc")
        # last.pt records no AUC of its own weights: name the file by its step instead.
        tag = f"{valid_auc:.4f}" if valid_auc is not None else \
            f"last-step{loaded.checkpoint.get('loop_state', {}).get('global_step', 0)}"
        out = Path("submissions") / f"{loaded.run_dir.name}_{tag}.csv"
    sidecar = write_submission(loaded, out, column=column.value, make_zip=make_zip)
    console.print(f"wrote {sidecar['rows']} rows to {out}" + (f" and {sidecar['zip']}" if make_zip else ""))
    print(json.dumps(sidecar, default=str) if as_json else out)


@app.command()
@_user_errors
def evaluate(
    run: RunOption = None,
    truth: Annotated[Path | None, typer.Option(help="Generator truth folder (e.g. data/demo/hidden).")]
    = None,
    features: Annotated[Path | None, typer.Option(help="Feature folder (default: the one trained on).")]
    = None,
    split: Annotated[PredictSplit, typer.Option(help="valid, or test (needs --truth: generated data).")]
    = PredictSplit.valid,
    as_json: JsonOption = False,
) -> None:
    """AUC, GAUC, logloss, normalised entropy and calibration on valid (+ the oracle on generated data)."""
    from qin.evaluation import evaluate_run
    from qin.predict import load_run

    loaded = load_run(_run_dir_or_latest(run), feature_dir=features)
    _say_warnings(loaded)
    result = evaluate_run(loaded, truth, split=split.value)
    if not as_json:  # the table is for people (stderr); the JSON line on stdout is for scripts, always
        table = Table(title=split.value)
        for key in result:
            table.add_column(key)
        table.add_row(*(f"{v:.0f}" if k == "rows" else f"{v:.5f}" for k, v in result.items()))
        console.print(table)
    print(json.dumps(result))


@app.command()
@_user_errors
def report(
    run: RunOption = None,
    truth: Annotated[Path | None, typer.Option(help="Generator truth (default: <data>/hidden if there).")]
    = None,
    features: Annotated[Path | None, typer.Option(help="Feature folder (default: the one trained on).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="HTML file (default: <run>/error_analysis.html).")] = None,
    compare: Annotated[Path | None, typer.Option(help="A second finished run on the same validation rows: "
                                                      "both side by side, and the rows where they disagree.")]
    = None,
) -> None:
    """Execute the error-analysis notebook for a run: <run>/error_analysis.{ipynb,html} and <run>/figures/."""
    from qin.analysis import render_report

    result = render_report(_run_dir_or_latest(run), out_html=out, truth_dir=truth, feature_dir=features,
                           compare_run=compare)
    console.print(f"wrote {result.notebook}, {result.html} and {len(result.figures)} figures in "
                  f"{result.notebook.parent / 'figures'} ({result.seconds:.0f} s)")
    print(result.html)


@app.command()
@_user_errors
def embed(
    source: Annotated[EmbedSource, typer.Option("--from", help="precomputed: the organisers' BERT+CLIP "
                                                               "vectors; content: encode titles and covers.")]
    = EmbedSource.precomputed,
    data: Annotated[Path, typer.Option(help="Data folder: item_feature.parquet, MicroLens_1M_x1/, "
                                            "item_images/.")]
    = Path("data/demo"),
    out: Annotated[Path | None, typer.Option(help="Item table to write "
                                                  "(default: <data>/item_info_<from>.parquet).")]
    = None,
    text_model: Annotated[Path | None, typer.Option(help="Local transformers text model "
                                                         "(default: bundled MiniLM).")]
    = None,
    image_model: Annotated[Path | None, typer.Option(help="Local transformers image model folder "
                                                          "(e.g. CLIP).")]
    = None,
    images: Annotated[Path | None, typer.Option(help="Cover images folder (default: <data>/item_images).")]
    = None,
    text_weight: Annotated[float, typer.Option(help="Weight of the text modality in the fusion.")] = 0.5,
    image_weight: Annotated[float, typer.Option(help="Weight of the image modality in the fusion.")] = 0.5,
    fusion: Annotated[FusionChoice, typer.Option(help="How text and image vectors are fused.")]
    = FusionChoice.concat,
    dim: Annotated[int, typer.Option(help="PCA output width (the challenge requires 128).")] = 128,
    batch_size: Annotated[int, typer.Option(help="Encoder batch size.")] = 64,
    cache_dir: Annotated[Path, typer.Option(help="Per-encoder cache of encoded vectors.")]
    = Path("features/embed_cache"),
    tune: Annotated[TuneChoice, typer.Option(help="histories: tune the vectors of --content on the training "
                                                  "histories (item_seq only, never a label).")]
    = TuneChoice.none,
    content: Annotated[Path | None, typer.Option(help="With --tune histories: the item table whose vectors "
                                                      "are tuned (default: <data>/MicroLens_1M_x1/"
                                                      "item_info.parquet, the organisers' PCA recipe).")]
    = None,
    tune_steps: Annotated[int, typer.Option(help="With --tune histories: optimizer steps.")] = 2000,
    seed: Annotated[int, typer.Option(help="With --tune histories: random seed.")] = 0,
    content_share: Annotated[float, typer.Option(help="With --tune histories: the share of the output kept "
                                                      "as the content's principal components (0: all of "
                                                      "it learned).")] = 0.0,
    residual_dropout: Annotated[float, typer.Option(help="With --tune histories: the share of every batch "
                                                         "scored on content alone (no per-item residual), "
                                                         "so cold items' vectors are trained for.")] = 0.0,
) -> None:
    """Build the 128-d multimodal item embedding (Task 1) as an item_info-compatible table."""
    from qin.embed import Fusion, embed_from_content, embed_from_precomputed

    item_feature, item_info = data / "item_feature.parquet", data / "MicroLens_1M_x1" / "item_info.parquet"
    if tune is TuneChoice.histories:
        from qin.embed.tune import TuneSettings, tune_on_histories

        ignored = [name for name, changed in (
            ("--from", source is not EmbedSource.precomputed), ("--text-model", text_model is not None),
            ("--image-model", image_model is not None), ("--images", images is not None),
            ("--fusion", fusion is not FusionChoice.concat)) if changed]
        if ignored:
            raise QinError(f"--tune histories tunes the table of --content, so {', '.join(ignored)} would be "
                           "ignored; build that table first with `qin embed --from ...`")
        settings = TuneSettings(dim=dim, steps=tune_steps, seed=seed, content_share=content_share,
                                residual_dropout=residual_dropout)
        table = tune_on_histories(content or item_info, data / "MicroLens_1M_x1" / "train.parquet",
                                  out or data / "item_info_tuned.parquet", settings, progress=_progress())
        console.print(f"wrote {table.out}: {table.items} items, {table.warm_items} of them in a training "
                      f"history ({table.histories} distinct histories), final InfoNCE {table.final_loss:.3f} "
                      f"({table.seconds:.1f} s)")
        console.print(f"use it with: --set data.item_info={table.out}")
        return
    if content is not None or tune_steps != 2000 or seed != 0 or content_share != 0 or residual_dropout != 0:
        raise QinError("--content, --tune-steps, --seed, --content-share and --residual-dropout only apply "
                       "with --tune histories")
    target = out or data / f"item_info_{source.value}.parquet"
    content_only = {"--text-model": text_model is not None, "--image-model": image_model is not None,
                    "--images": images is not None, "--text-weight": text_weight != 0.5,
                    "--image-weight": image_weight != 0.5, "--fusion": fusion is not FusionChoice.concat,
                    "--batch-size": batch_size != 64}
    given = [name for name, changed in content_only.items() if changed]
    image_only = [name for name, changed in (("--image-weight", image_weight != 0.5),
                                             ("--images", images is not None)) if changed]
    if source is EmbedSource.content and image_model is None and image_only:
        raise QinError(f"{', '.join(image_only)} would be ignored: covers are encoded only with "
                       "--image-model (a local image model folder)")
    if source is EmbedSource.precomputed and given:
        raise QinError(f"--from precomputed encodes nothing, so {', '.join(given)} would be ignored; "
                       "drop them or use --from content")
    if source is EmbedSource.precomputed:
        result = embed_from_precomputed(item_feature, item_info, target, dim=dim)
    else:
        result = embed_from_content(item_feature, item_info, images, target, text_model=text_model,
                                    image_model=image_model, text_weight=text_weight,
                                    image_weight=image_weight, dim=dim, batch_size=batch_size,
                                    cache_dir=cache_dir, fusion=Fusion(fusion.value))
    console.print(f"wrote {result.out}: {result.items} items, "
                  f"PCA keeps {100 * result.explained_variance:.1f}% "
                  f"of the variance; missing titles {result.missing_titles}, missing images "
                  f"{result.missing_images} ({result.seconds:.1f} s)")
    console.print(f"use it with: --set data.item_info={result.out}")


@app.command()
@_user_errors
def neighbors(
    item_id: Annotated[int, typer.Argument(help="Item to look up.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    table: Annotated[Path, typer.Option(help="Item table with item_emb_d128.")]
    = Path("data/demo/MicroLens_1M_x1/item_info.parquet"),
    data: Annotated[Path | None, typer.Option(help="Data folder with item_feature.parquet (for titles).")]
    = None,
    compare: Annotated[Path | None, typer.Option(help="A second item table (e.g. `qin embed --tune "
                                                      "histories`'s): its neighbours are shown beside.")]
    = None,
) -> None:
    """The k nearest items (cosine over the item embedding) with their titles and tags."""
    from rich.columns import Columns

    from qin.embed import neighbors as nearest

    item_feature = (data / "item_feature.parquet") if data else table.parent.parent / "item_feature.parquet"
    if data is not None and not item_feature.is_file():
        raise QinError(f"{item_feature}: file not found (--data must hold item_feature.parquet, for titles)")
    shown = []
    for source in (table, *([compare] if compare is not None else [])):
        frame = nearest(source, item_feature if item_feature.is_file() else None, item_id, k=k)
        out = Table(title=f"nearest items to {item_id} in {source.name}")
        for column in frame.columns:
            out.add_column(column)
        for row in frame.iter_rows():
            out.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
        shown.append(out)
    Console().print(Columns(shown) if len(shown) > 1 else shown[0])


@app.command()
@_user_errors
def demo(
    size: Annotated[DemoSize, typer.Option(help="Demo data size.")] = DemoSize.small,
    config: ConfigOption = None,
    overrides: SetOption = None,
    out: Annotated[Path, typer.Option(help="Submission file.")] = Path("submissions/demo_submission.csv"),
) -> None:
    """The whole job on generated data: synth -> preprocess -> train -> predict -> evaluate."""
    from qin.demo import run_demo

    summary = run_demo(size.value, _load_config(config, overrides, default=Path("configs/demo.yaml")), out,
                       console)
    console.print(f"[bold]validation AUC {summary['valid_auc']:.4f}[/bold]  "
                  f"oracle AUC {summary['oracle_auc']:.4f}"
                  f"  ({100 * (summary['valid_auc'] - 0.5) / (summary['oracle_auc'] - 0.5):.1f}% of the "
                  f"oracle's lift over chance)")
    console.print(f"submission: {summary['submission']}")


def main() -> None:  # pragma: no cover - `python -m qin`
    # torchrun sets these; keep BLAS from oversubscribing cores when several processes share a CPU.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    app(prog_name="qin", args=sys.argv[1:])
