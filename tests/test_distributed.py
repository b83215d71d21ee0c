"""DDP on CPU (gloo): 2 processes match one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qin.data import SplitTensors, epoch_order
from qin.distributed import Context
from qin.train import shard_order

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("rows", "batch"), [(20, 8), (24, 8), (17, 8)])
def test_shards_together_cover_each_global_batch(rows, batch):
    order = epoch_order(rows, seed=3, epoch=0)
    shards = [shard_order(order, batch, Context(rank=r, world_size=2)) for r in range(2)]
    local = shards[0][1]
    assert local == batch // 2
    for step in range(rows // batch):
        together = torch.cat([s[step * local:(step + 1) * local] for s, _ in shards])
        assert sorted(together.tolist()) == sorted(order[step * batch:(step + 1) * batch].tolist())
    tail = rows % batch
    covered = sum(len(s) for s, _ in shards)
    assert covered == (rows if tail >= 2 or tail == 0 else rows - tail)


def test_split_shard_is_disjoint_and_complete():
    split = SplitTensors(item_id=torch.arange(11, dtype=torch.int32),
                         history=torch.zeros(11, 3, dtype=torch.int32),
                         likes_level=torch.ones(11, dtype=torch.int8),
                         views_level=torch.ones(11, dtype=torch.int8),
                         label=torch.zeros(11))
    parts = [split.shard(r, 3).item_id.tolist() for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))


def _train(config: Path, run_dir: Path, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        command = [sys.executable, "-m", "qin", "train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "qin", "train"]
    command += ["--config", str(config), "--run-dir", str(run_dir), "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((run_dir / "result.json").read_text())


def test_two_processes_match_one(tiny_data, tmp_path):
    config = tmp_path / "ddp.yaml"
    config.write_text(
        f"base: {ROOT / 'qin.yaml'}\n"
        f"data:\n  raw_dir: {tiny_data / 'MicroLens_1M_x1'}\n  features_root: {tmp_path / 'features'}\n"
        "  max_len: 16\n"
        # no dropout and no BN: then the only difference between 1 and 2 processes is float summation order
        "model:\n  embedding_dim: 8\n  num_layers: 2\n  num_row: 2\n  net_dropout: 0.0\n  batch_norm: false\n"
        f"train:\n  batch_size: 512\n  epochs: 2\n  threads: 1\n  run_root: {tmp_path / 'runs'}\n"
    )
    single = _train(config, tmp_path / "runs" / "one", nproc=1)
    double = _train(config, tmp_path / "runs" / "two", nproc=2)
    assert double["steps"] == single["steps"]
    assert abs(double["valid_auc"] - single["valid_auc"]) < 2e-3
    # rank 0 alone wrote the run's files; the metrics log has one line per evaluation
    lines = (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert np.isfinite(double["valid_logloss"])
