"""Error analysis of a finished run: where the model is wrong, and why.

Plain functions over the per-row validation predictions (`qin.predict.validation_predictions`) and
the feature tables; the notebook `qin/notebooks/error_analysis.ipynb` only calls them (`from qin import
analysis`) and shows what they return, and `render_report` executes that notebook for a run (`qin report`).

    load_analysis(run_dir)          -> AnalysisData: one row per validation row, joined with item facts
                                       (load.py; its docstring lists the columns)
    overall_metrics / slice_auc / calibration_table / worst_errors / nearest_items / attention_for /
    learning_curves                 -> polars frames (tables.py; tested on hand-made data)
    plot_*                          -> matplotlib Figures (plots.py; no pyplot: nothing global, nothing shown)
    render_report                   -> Report (report.py; the notebook kernel in kernel.py)
"""

from qin.analysis.load import (
    DEFAULT_COLD_MAX,
    AnalysisData,
    example_row,
    load_analysis,
    user_targets,
)
from qin.analysis.plots import (
    FIG_DPI,
    plot_attention,
    plot_calibration,
    plot_learning_curves,
    plot_score_histograms,
    plot_slice_auc,
)
from qin.analysis.report import FIGURE_TAG, NOTEBOOK, REPORT_MARK, Report, render_report
from qin.analysis.tables import (
    HISTORY_BUCKETS,
    POPULARITY_BUCKETS,
    BinStrategy,
    ErrorKind,
    attention_for,
    bucket_labels,
    calibration_table,
    expected_calibration_error,
    explain_errors,
    learning_curves,
    nearest_items,
    overall_metrics,
    slice_auc,
    standard_slices,
    worst_errors,
)

__all__ = [
    "DEFAULT_COLD_MAX", "FIGURE_TAG", "FIG_DPI", "HISTORY_BUCKETS", "NOTEBOOK", "POPULARITY_BUCKETS",
    "REPORT_MARK", "AnalysisData", "BinStrategy", "ErrorKind", "Report", "attention_for", "bucket_labels",
    "calibration_table", "example_row", "expected_calibration_error", "explain_errors", "learning_curves",
    "load_analysis", "nearest_items", "overall_metrics", "plot_attention", "plot_calibration",
    "plot_learning_curves", "plot_score_histograms", "plot_slice_auc", "render_report", "slice_auc",
    "standard_slices", "user_targets", "worst_errors",
]
