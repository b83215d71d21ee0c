"""Shared fixtures: one `tiny` generated data set and its features per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qin.config import Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _small_thread_count():
    # Tests run on shared 2-core machines; one thread keeps CPU results reproducible and fast.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`qin synth --size tiny` output folder (data set + hidden/)."""
    from qin.synth import SynthSize, synthesize

    out = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(out, SynthSize.tiny, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_features(tiny_data, tmp_path_factory) -> Path:
    from qin.features.pipeline import build_features

    out = tmp_path_factory.mktemp("features") / "tiny-L16"
    return build_features(tiny_data / "MicroLens_1M_x1", out, max_len=16, progress=False).feature_dir


def tiny_config(tiny_data: Path, run_root: Path, **train_changes) -> Config:
    """A few-second QIN on tiny data."""
    raw = {
        "data": {"raw_dir": str(tiny_data / "MicroLens_1M_x1"), "max_len": 16,
                 "features_root": str(run_root / "features")},
        "model": {"embedding_dim": 8, "num_layers": 2, "num_row": 2, "mlp_hidden": [32, 16],
                  "din_attention_hidden": [16, 8]},
        "train": {"batch_size": 512, "epochs": 3, "patience": 2, "eval_batch_size": 4096,
                  "run_root": str(run_root), "seed": 7, **train_changes},
    }
    return Config.from_dict(raw)
