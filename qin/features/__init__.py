"""Feature building (`qin preprocess`) and loading: raw challenge parquet -> memory-mapped arrays.

    build_features(raw_dir, out_dir, max_len)  ->  BuildResult     (pipeline.py)
    load_features(feature_dir)                 ->  FeatureSet      (io.py)
    feature_dir_for(features_root, raw_dir, ...) -> Path           (folder.py)

The modules: pipeline.py runs a build; raw.py reads the raw parquet files; validate.py checks them;
steps.py transforms them; write.py writes the arrays; io.py is the feature folder's format (its
layout and dtypes are documented there); folder.py names a folder and tells whether it is up to
date; publish.py replaces one safely (temp folders, markers, stale-folder cleanup).
"""

from qin.features.folder import feature_dir_for
from qin.features.io import FeatureSet, SplitArrays, load_features
from qin.features.pipeline import BuildResult, build_features

__all__ = ["BuildResult", "FeatureSet", "SplitArrays", "build_features", "feature_dir_for", "load_features"]
