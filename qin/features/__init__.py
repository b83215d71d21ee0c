"""Feature building (`qin preprocess`) and loading: raw challenge parquet -> memory-mapped arrays.

    build_features(raw_dir, out_dir, max_len)  ->  BuildResult     (pipeline.py)
    load_features(feature_dir)                 ->  FeatureSet      (io.py)

The folder layout and dtypes are documented in `qin.features.io`.
"""

from qin.features.io import FeatureSet, SplitArrays, load_features
from qin.features.pipeline import BuildResult, build_features, feature_dir_for

__all__ = ["BuildResult", "FeatureSet", "SplitArrays", "build_features", "feature_dir_for", "load_features"]
