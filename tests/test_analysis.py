"""Error analysis: each function on hand-made frames, then the notebook end to end on a tiny run."""

from __future__ import annotations

import ast
import json
from importlib.resources import files
from pathlib import Path

import nbformat
import numpy as np
import polars as pl
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import log_loss, roc_auc_score
from typer.testing import CliRunner

from qin import analysis
from qin.analysis import report
from qin.cli import app
from qin.data import SplitTensors
from qin.errors import QinError
from tests.conftest import ROOT, tiny_config

NOTEBOOK = ROOT / "qin" / "notebooks" / "error_analysis.ipynb"


def predictions(rows: int = 400, seed: int = 0, oracle: bool = False) -> pl.DataFrame:
    """A validation-like frame: labels drawn from p, a noisy score, slicing columns."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, rows)
    label = (rng.uniform(size=rows) < p).astype(np.float64)
    frame = pl.DataFrame({
        "row": np.arange(rows, dtype=np.int64),
        "user_id": rng.integers(0, 50, rows),
        "item_id": rng.integers(1, 30, rows),
        "likes_level": rng.integers(0, 3, rows),
        "history_len": rng.integers(0, 40, rows),
        "train_count": rng.integers(0, 300, rows),
        "tags": [list(rng.choice([1, 2, 3, 4], size=rng.integers(1, 3), replace=False)) for _ in range(rows)],
        "label": label,
        "prediction": np.clip(p + rng.normal(0, 0.25, rows), 0.0, 1.0),
    })
    return frame.with_columns(p_true=pl.Series(p)) if oracle else frame


# ---------------------------------------------------------------------------------------------------------
# Tables on hand-made data


def test_slice_auc_equals_sklearn_on_each_slice():
    frame = predictions(oracle=True)
    table = analysis.slice_auc(frame, "likes_level")
    assert table["slice"].to_list() == ["0", "1", "2"]
    for level, row in zip(range(3), table.iter_rows(named=True), strict=True):
        part = frame.filter(pl.col("likes_level") == level)
        assert row["rows"] == part.height and row["positives"] == int(part["label"].sum())
        assert row["auc"] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))
        assert row["oracle_auc"] == pytest.approx(roc_auc_score(part["label"], part["p_true"]))
        assert row["mean_prediction"] == pytest.approx(part["prediction"].mean())


def test_slice_auc_buckets_are_left_closed_and_named():
    frame = predictions()
    table = analysis.slice_auc(frame, "history_len", buckets=[1, 10, 20])
    assert table["slice"].to_list() == ["1-9", "10-19", ">=20"]
    assert table["rows"].sum() == frame.filter(pl.col("history_len") >= 1).height  # rows below 1 are dropped
    part = frame.filter((pl.col("history_len") >= 10) & (pl.col("history_len") < 20))
    assert table["auc"][1] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))
    assert analysis.bucket_labels([0, 1, 5]) == ["0", "1-4", ">=5"]
    assert analysis.bucket_labels([0.0, 0.5]) == ["[0, 0.5)", ">=0.5"]
    assert analysis.bucket_labels([0.25, 0.5, 1.0]) == ["[0.25, 0.5)", "[0.5, 1)", ">=1"]
    with pytest.raises(QinError, match="ascending"):
        analysis.slice_auc(frame, "history_len", buckets=[5, 1])
    with pytest.raises(QinError, match="no column"):
        analysis.slice_auc(frame, "missing")


def test_slice_auc_over_a_list_column_counts_a_row_in_each_of_its_slices():
    frame = predictions()
    table = analysis.slice_auc(frame, "tags", top=2)
    counts = frame.explode("tags")["tags"].value_counts().sort(["count", "tags"], descending=[True, False])
    assert table["slice"].to_list() == [str(t) for t in counts["tags"][:2]]
    tag = int(table["slice"][0])
    part = frame.filter(pl.col("tags").list.contains(tag))
    assert table["rows"][0] == part.height
    assert table["auc"][0] == pytest.approx(roc_auc_score(part["label"], part["prediction"]))


def test_slice_with_one_class_has_nan_auc():
    frame = pl.DataFrame({"label": [1.0, 1.0, 0.0, 1.0], "prediction": [0.9, 0.8, 0.1, 0.7],
                          "g": [0, 0, 1, 1]})
    table = analysis.slice_auc(frame, "g")
    assert np.isnan(table["auc"][0]) and table["auc"][1] == 1.0


def test_calibration_table_bins():
    frame = pl.DataFrame({"prediction": [0.05, 0.15, 0.12, 0.95, 1.0, 0.5],
                          "label": [0.0, 0.0, 1.0, 1.0, 1.0, 0.0]})
    table = analysis.calibration_table(frame, bins=10)
    assert table["bin"].to_list() == [0, 1, 5, 9]  # empty bins left out; 1.0 falls in the last bin
    assert table["rows"].to_list() == [1, 2, 1, 2]
    assert table["mean_prediction"][1] == pytest.approx(0.135)
    assert table["label_rate"].to_list() == [0.0, 0.5, 0.0, 1.0]
    assert table["lower"][3] == pytest.approx(0.9) and table["upper"][3] == pytest.approx(1.0)
    quantile = analysis.calibration_table(predictions(rows=1000), bins=4, strategy="quantile")
    assert quantile.height == 4 and quantile["rows"].to_list() == [250, 250, 250, 250]
    with pytest.raises(ValueError):
        analysis.calibration_table(frame, strategy="isotonic")


def test_calibration_table_and_overall_metrics_carry_the_oracle():
    frame = predictions(oracle=True)
    assert "mean_p_true" in analysis.calibration_table(frame).columns
    metrics = {row["metric"]: row for row in analysis.overall_metrics(frame).iter_rows(named=True)}
    assert metrics["AUC"]["model"] == pytest.approx(roc_auc_score(frame["label"], frame["prediction"]))
    assert metrics["AUC"]["oracle"] == pytest.approx(roc_auc_score(frame["label"], frame["p_true"]))
    clipped = np.clip(frame["prediction"].to_numpy(), 1e-7, 1 - 1e-7)
    assert metrics["logloss"]["model"] == pytest.approx(log_loss(frame["label"], clipped))
    assert metrics["rows"]["model"] == frame.height
    assert analysis.overall_metrics(predictions())["oracle"].null_count() == 6


def test_expected_calibration_error():
    # two bins: [0.1]*2 with rate 0.5 (gap 0.4), [0.9]*2 with rate 1.0 (gap 0.1): mean gap 0.25
    assert analysis.expected_calibration_error(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])) \
        == pytest.approx(0.25)
    assert analysis.expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_worst_errors_order():
    frame = pl.DataFrame({"row": [0, 1, 2, 3, 4, 5], "label": [0.0, 0.0, 0.0, 1.0, 1.0, 1.0],
                          "prediction": [0.9, 0.95, 0.9, 0.2, 0.05, 0.6]})
    fp = analysis.worst_errors(frame, "false_positive", n=2)
    assert fp["row"].to_list() == [1, 0]  # highest first; the tie at 0.9 goes to the lower row
    fn = analysis.worst_errors(frame, analysis.ErrorKind.false_negative, n=5)
    assert fn["row"].to_list() == [4, 3, 5]
    with pytest.raises(ValueError):
        analysis.worst_errors(frame, "false_alarm")


def test_example_row_prefers_clicked_new_targets_with_long_histories():
    frame = pl.DataFrame({"row": [0, 1, 2, 3, 4], "label": [1.0, 1.0, 1.0, 0.0, 1.0],
                          "repeat": [True, False, False, False, False], "history_len": [9, 9, 9, 9, 3],
                          "prediction": [0.99, 0.6, 0.8, 0.99, 0.99]})
    assert analysis.example_row(frame) == 2


def test_learning_curves_parse(tmp_path):
    lines = [{"epoch": 2, "step": 20, "lr": 1e-3, "train_loss": 0.5, "valid_auc": 0.7, "valid_logloss": 0.6},
             {"epoch": 1, "step": 10, "lr": 2e-3, "train_loss": 0.6, "valid_auc": 0.6, "valid_logloss": 0.62}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    curves = analysis.learning_curves(tmp_path)
    assert curves["step"].to_list() == [10, 20] and curves["lr"].to_list() == [2e-3, 1e-3]
    assert curves.schema["valid_auc"] == pl.Float64
    with pytest.raises(QinError, match="no metrics log"):
        analysis.learning_curves(tmp_path / "missing")
    # A torn last line (a run killed mid-append) is skipped; a bad line before the end is an error.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_auc": 0.5}\n{"step": 2, "valid_au')
    assert analysis.learning_curves(tmp_path)["step"].to_list() == [1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "valid_auc": 0.5}\nnot json\n{"step": 2}\n')
    with pytest.raises(QinError, match="line 2 is not valid JSON"):
        analysis.learning_curves(tmp_path)


def test_plots_return_figures_with_content():
    frame = predictions(oracle=True)
    slices = {"likes": analysis.slice_auc(frame, "likes_level"),
              "tags": analysis.slice_auc(frame, "tags", top=3)}
    curves = pl.DataFrame({"step": [1, 2], "lr": [1e-3, 5e-4], "train_loss": [0.6, 0.5],
                           "valid_auc": [0.6, 0.7], "valid_logloss": [0.6, 0.55]})
    attention = pl.DataFrame({
        "target_item": [7, 7, 8, 8], "target_title": ["a", "a", None, None], "label": [1.0, 1.0, None, None],
        "prediction": [0.9, 0.9, 0.2, 0.2], "slot": [0, 1, 0, 1], "item_id": [3, 7, 3, 7],
        "title": ["x", "y", "x", "y"], "weight": [0.5, 1.0, 0.0, 0.1],
        "shares_tag": [True, False, False, False], "cosine": [0.1, 1.0, 0.0, 0.2]})
    figures = [
        analysis.plot_slice_auc(slices, overall_auc=0.7),
        analysis.plot_calibration(analysis.calibration_table(frame)),
        analysis.plot_score_histograms(frame),
        analysis.plot_learning_curves(curves),
        analysis.plot_attention(None),
        analysis.plot_attention(attention),
    ]
    for figure in figures:
        assert isinstance(figure, Figure) and figure.axes
    assert len([ax for ax in figures[0].axes if ax.get_visible()]) == 2
    assert len(figures[2].axes) == 2  # model and oracle histograms
    assert len(figures[5].axes) == 2  # one panel per target


def test_figure_images_are_named_by_cell_tag():
    png = "iVBORw0KGgo="  # base64 of the PNG signature
    cell = nbformat.v4.new_code_cell("x", metadata={"tags": ["figure:calibration"]})
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png}),
                    nbformat.v4.new_output("execute_result", data={"image/png": png}, execution_count=1)]
    untagged = nbformat.v4.new_code_cell("y")
    untagged.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png})]
    images = report._figure_images(nbformat.v4.new_notebook(cells=[cell, untagged]))
    assert [name for name, _ in images] == ["calibration.png", "calibration-2.png"]
    assert images[0][1].startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------------------------
# The package


def test_the_package_exports_its_public_api():
    """Every public name of the former single-module qin.analysis, still at `analysis.<name>`."""
    public = {
        "AnalysisData", "BinStrategy", "DEFAULT_COLD_MAX", "ErrorKind", "FIGURE_TAG", "FIG_DPI",
        "HISTORY_BUCKETS",
        "NOTEBOOK", "POPULARITY_BUCKETS", "REPORT_MARK", "Report", "attention_for", "bucket_labels",
        "calibration_table", "example_row", "expected_calibration_error", "explain_errors", "learning_curves",
        "load_analysis", "nearest_items", "overall_metrics", "plot_attention", "plot_calibration",
        "plot_learning_curves", "plot_score_histograms", "plot_slice_auc", "render_report", "slice_auc",
        "standard_slices", "user_targets", "worst_errors",
    }
    assert set(analysis.__all__) == public
    for name in public:
        assert hasattr(analysis, name), name


def test_no_module_uses_another_modules_private_names():
    modules = {path.stem for path in (ROOT / "qin" / "analysis").glob("*.py")}
    for path in (ROOT / "qin" / "analysis").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qin."):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert not (node.value.id in modules and node.attr.startswith("_")), \
                    f"{path.name} uses {node.value.id}.{node.attr}"


def test_the_notebook_is_package_data():
    assert analysis.NOTEBOOK == files("qin") / "notebooks" / "error_analysis.ipynb"
    assert analysis.NOTEBOOK.is_file() and Path(str(analysis.NOTEBOOK)) == NOTEBOOK


# ---------------------------------------------------------------------------------------------------------
# The committed notebook


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {index} has committed outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {index} has an execution count: clear it"


def test_committed_notebook_holds_analysis_only():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert code[0].count("RUN_DIR =") == 1 and "QIN_RUN_DIR" in code[0]  # the run is set in the first cell
    for source in code:
        assert "def " not in source and "class " not in source and "import torch" not in source
    tags = {tag for cell in nb.cells for tag in cell.metadata.get("tags", [])}
    assert {"figure:slices", "figure:calibration", "figure:attention", "figure:learning_curves"} <= tags


# ---------------------------------------------------------------------------------------------------------
# A run trained on tiny data


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tiny_features, tmp_path_factory) -> Path:
    from qin.features.io import load_features
    from qin.train import fit

    root = tmp_path_factory.mktemp("analysis")
    fit(tiny_config(tiny_data, root, epochs=2), load_features(tiny_features), root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def loaded(tiny_run) -> analysis.AnalysisData:
    return analysis.load_analysis(tiny_run)


def test_load_analysis_joins_item_facts_and_the_oracle(loaded, tiny_data):
    frame = loaded.frame
    valid = pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "valid.parquet")
    train = pl.read_parquet(tiny_data / "MicroLens_1M_x1" / "train.parquet")
    assert frame.height == valid.height and frame["item_id"].to_list() == valid["item_id"].to_list()
    assert loaded.truth_dir == tiny_data / "hidden"
    assert loaded.item_feature == tiny_data / "item_feature.parquet"
    truth = pl.read_parquet(tiny_data / "hidden" / "valid_truth.parquet").sort("row")
    assert np.allclose(frame["p_true"].to_numpy(), truth["p_true"].to_numpy())
    counts = dict(train["item_id"].value_counts().iter_rows())
    assert frame["train_count"].to_list() == [counts.get(i, 0) for i in frame["item_id"]]
    assert frame["cold"].to_list() == [c <= loaded.cold_max for c in frame["train_count"]]
    titles = dict(pl.read_parquet(tiny_data / "item_feature.parquet", columns=["item_id", "item_title"])
                  .rows())
    assert frame["title"][0] == titles[frame["item_id"][0]]
    kept = [[i for i in seq if i != 0][-16:] for seq in valid["item_seq"].to_list()]  # the model's max_len
    expected = [item in seq for item, seq in zip(valid["item_id"], kept, strict=True)]
    assert frame["repeat"].to_list() == expected


def test_nearest_items_match_the_embed_command(loaded, tiny_data):
    from qin.embed import neighbors

    item = int(loaded.frame["item_id"][0])
    ours = analysis.nearest_items(loaded, [item], k=5)
    reference = neighbors(tiny_data / "MicroLens_1M_x1" / "item_info.parquet", None, item, k=5)
    assert ours["item_id"].to_list() == reference["item_id"].to_list()
    assert np.allclose(ours["score"].to_numpy(), reference["score"].to_numpy(), atol=1e-5)
    assert item not in ours["item_id"].to_list() and ours["title"].null_count() == 0


def test_explain_errors_lists_neighbours(loaded):
    table = analysis.explain_errors(loaded, "false_negative", n=4, k=2)
    assert table.height == 4 and (table["prediction"].diff().drop_nulls() >= 0).all()
    assert table["neighbours"].str.count_matches(r" \| ").to_list() == [1, 1, 1, 1]


def test_attention_matches_the_model(loaded):
    import torch

    row = analysis.example_row(loaded.frame)
    targets = analysis.user_targets(loaded, row)
    attention = analysis.attention_for(loaded, row, targets)
    valid = loaded.run.features.split("valid")
    history = np.asarray(valid.history[row])
    assert attention.height == len(targets) * int((history != 0).sum())
    own = attention.filter(pl.col("target_item") == targets[0]).sort("slot")
    assert own["prediction"][0] == pytest.approx(loaded.frame["prediction"][row], abs=1e-5)
    assert own["label"][0] == loaded.frame["label"][row]
    batch = SplitTensors.from_arrays(valid).batch(slice(row, row + 1))
    with torch.no_grad():
        expected = loaded.run.model.attention_weights(batch)[0].numpy()  # (L,)
    assert np.allclose(own["weight"].to_numpy(), expected[history != 0], atol=1e-6)
    assert own["item_id"].to_list() == history[history != 0].tolist()


def test_report_executes_the_notebook_headless(tiny_run):
    result = CliRunner().invoke(app, ["report", "--run", str(tiny_run)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    html = tiny_run / "error_analysis.html"
    assert html.is_file() and "Where is the model wrong" in html.read_text()
    executed = nbformat.read(tiny_run / "error_analysis.ipynb", as_version=4)
    errors = [o for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert errors == []
    figures = sorted(p.name for p in (tiny_run / "figures").glob("*.png"))
    assert len(figures) > 0
    assert figures == ["attention.png", "calibration.png", "learning_curves.png", "scores.png", "slices.png"]
    assert all((tiny_run / "figures" / name).read_bytes().startswith(b"\x89PNG") for name in figures)
    assert executed.metadata["qin"] == {"written_by": "qin report"}  # what lets the next report replace it
    # Again, given the checkpoint: the earlier executed copy, HTML and figures are the report's own.
    again = CliRunner().invoke(app, ["report", "--run", str(tiny_run / "best.pt")], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tiny_run / "figures").iterdir()) == figures


def test_report_help_and_missing_run(tmp_path):
    runner = CliRunner()
    assert "report" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["report", "--run", str(tmp_path)])
    assert result.exit_code == 2 and "no best.pt" in result.output
