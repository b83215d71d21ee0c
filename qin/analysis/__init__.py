"""Error analysis of a finished run: where the model is wrong, and why.

Plain functions over the per-row validation predictions (`qin.predict.validation_predictions`) and
the feature tables; the notebook `qin/notebooks/error_analysis.ipynb` only calls them (`from qin import
analysis`) and shows what they return, and `render_report` executes that notebook for a run (`qin report`).

    load_analysis(run_dir)          -> AnalysisData: one row per validation row, joined with item facts
                                       (load.py; its docstring lists the columns)
    with_baselines                  -> the frame + popularity and lr_2 baseline scores (baseline.py)
    overall_metrics / calibration_table / worst_errors / nearest_items / learning_curves
                                    -> polars frames (tables.py; tested on hand-made data)
    slice_auc / slice_calibration / standard_slices / calibration_by_slice
                                    -> metrics per slice (slices.py)
    attention_for / attention_stats -> one row's attention, and its statistics over many rows (attention.py)
    load_comparison / compare_*     -> two runs side by side on the same rows (compare.py)
    plot_*                          -> matplotlib Figures (plots.py; no pyplot: nothing global, nothing shown)
    render_report                   -> Report (report.py; the notebook kernel in kernel.py)
"""

from qin.analysis.attention import (
    ATTENTION_ROWS,
    AttentionStats,
    attention_for,
    attention_shares,
    attention_stats,
    recency_positions,
    summarize_attention,
)
from qin.analysis.baseline import BASELINE_COLUMNS, popularity_scores, with_baselines
from qin.analysis.compare import (
    Comparison,
    compare_frames,
    compare_overall,
    compare_slices,
    disagreement_summary,
    disagreements,
    load_comparison,
    slice_comparison,
)
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
    plot_attention_stats,
    plot_calibration,
    plot_comparison,
    plot_learning_curves,
    plot_score_histograms,
    plot_slice_auc,
    plot_slice_calibration,
)
from qin.analysis.report import COMPARE_TAG, FIGURE_TAG, NOTEBOOK, REPORT_MARK, Report, render_report
from qin.analysis.slices import (
    HISTORY_BUCKETS,
    POPULARITY_BUCKETS,
    bucket_labels,
    calibration_by_slice,
    slice_auc,
    slice_calibration,
    slice_parts,
    standard_slices,
)
from qin.analysis.tables import (
    BinStrategy,
    ErrorKind,
    calibration_table,
    expected_calibration_error,
    explain_errors,
    learning_curves,
    nearest_items,
    overall_metrics,
    worst_errors,
)

__all__ = [
    "ATTENTION_ROWS", "BASELINE_COLUMNS", "COMPARE_TAG", "DEFAULT_COLD_MAX", "FIGURE_TAG", "FIG_DPI",
    "HISTORY_BUCKETS", "NOTEBOOK", "POPULARITY_BUCKETS", "REPORT_MARK", "AnalysisData", "AttentionStats",
    "BinStrategy", "Comparison", "ErrorKind", "Report", "attention_for", "attention_shares",
    "attention_stats",
    "bucket_labels", "calibration_by_slice", "calibration_table", "compare_frames", "compare_overall",
    "compare_slices", "disagreement_summary", "disagreements", "example_row", "expected_calibration_error",
    "explain_errors", "learning_curves", "load_analysis", "load_comparison", "nearest_items",
    "overall_metrics", "plot_attention", "plot_attention_stats", "plot_calibration", "plot_comparison",
    "plot_learning_curves", "plot_score_histograms", "plot_slice_auc", "plot_slice_calibration",
    "popularity_scores", "recency_positions", "render_report", "slice_auc", "slice_calibration",
    "slice_comparison", "slice_parts", "standard_slices", "summarize_attention", "user_targets",
    "with_baselines", "worst_errors",
]
