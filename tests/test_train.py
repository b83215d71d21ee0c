"""Training loop: learns, is deterministic, resumes exactly, early-stops and decays the LR."""

from __future__ import annotations

import json

import pytest
import torch

from qin.config import ModelName
from qin.features.io import load_features
from qin.train import fit
from tests.conftest import tiny_config


class Interrupt(Exception):
    pass


def test_fit_learns_and_writes_run_files(tiny_data, tiny_features, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=4, patience=4)
    result = fit(cfg, load_features(tiny_features), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "best.pt", "last.pt", "result.json"} <= {
        p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == result.epochs_run and records[0]["epoch"] == 1
    # tiny data carries a strong planted signal: a few epochs must beat chance clearly
    assert result.valid_auc > 0.6
    assert result.valid_auc == pytest.approx(result.best_auc, abs=1e-9)
    assert (json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])["valid_auc"]
            == result.valid_auc)


def test_same_seed_same_result(tiny_data, tiny_features, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, epochs=2)
    features = load_features(tiny_features)
    first = fit(cfg, features, tmp_path / "a", progress=False)
    second = fit(cfg, features, tmp_path / "b", progress=False)
    assert [r["valid_auc"] for r in first.evaluations] == [r["valid_auc"] for r in second.evaluations]
    assert [r["train_loss"] for r in first.evaluations] == [r["train_loss"] for r in second.evaluations]


@pytest.mark.parametrize("interrupt_at", [5, 16])  # mid-epoch 1 (after its eval at step 4), and in epoch 4
def test_resume_matches_an_uninterrupted_run(tiny_data, tiny_features, tmp_path, interrupt_at):
    # 8,000 rows / batch 2,000 = 4 steps an epoch; evaluate every 2 steps so mid-epoch state matters
    cfg = tiny_config(tiny_data, tmp_path, epochs=5, patience=10, batch_size=2000, eval_steps=2)
    features = load_features(tiny_features)
    whole = fit(cfg, features, tmp_path / "whole", progress=False)

    def stop(step: int) -> None:
        if step == interrupt_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, features, tmp_path / "cut", progress=False, on_step=stop)
    resumed = fit(cfg, features, tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == whole.steps
    assert [r["valid_auc"] for r in resumed.evaluations] == [r["valid_auc"] for r in whole.evaluations]
    assert resumed.valid_auc == whole.valid_auc


ZOO = ["dcnv2", "transformer_dcn", "din_sa", "dlf"]


@pytest.mark.parametrize("name", ZOO)
def test_zoo_resumes_exactly(tiny_data, tiny_features, tmp_path, name):
    """Each zoo model, cut mid-epoch (dropout and batch norm on), resumes to the uninterrupted run's."""
    cfg = tiny_config(tiny_data, tmp_path, epochs=2, patience=10, batch_size=2000, eval_steps=2).replace(
        "model", name=name, dlf_tokens=4, dlf_hidden=16, dlf_rank=3)
    features = load_features(tiny_features)
    whole = fit(cfg, features, tmp_path / "whole", progress=False)

    def stop(step: int) -> None:
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        fit(cfg, features, tmp_path / "cut", progress=False, on_step=stop)
    resumed = fit(cfg, features, tmp_path / "cut", resume=True, progress=False)
    assert [r["valid_auc"] for r in resumed.evaluations] == [r["valid_auc"] for r in whole.evaluations]
    assert [r["train_loss"] for r in resumed.evaluations] == [r["train_loss"] for r in whole.evaluations]


def test_lr_halves_on_plateau_and_patience_stops(tiny_data, tiny_features, tmp_path):
    # min_delta=1 makes every evaluation after the first "not improved"
    cfg = tiny_config(tiny_data, tmp_path, epochs=10, patience=3, min_delta=1.0, learning_rate=1e-3)
    result = fit(cfg, load_features(tiny_features), tmp_path / "run", progress=False)
    lrs = [r["lr"] for r in result.evaluations]
    assert result.stopped_early and len(lrs) == 4
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])
    assert result.best_epoch == 1


def test_max_steps_and_every_model_trains(tiny_data, tiny_features, tmp_path):
    for name in [model.value for model in ModelName]:
        cfg = tiny_config(tiny_data, tmp_path, max_steps=3).replace("model", name=name)
        result = fit(cfg, load_features(tiny_features), tmp_path / name, progress=False)
        assert result.steps == 3, name
        # max_steps ends the run with an evaluation, whose weights are the best.pt scored at the end
        assert [record["step"] for record in result.evaluations] == [3], name
        assert result.valid_auc == pytest.approx(result.evaluations[-1]["valid_auc"], abs=1e-9), name


def test_resume_without_checkpoint_is_a_clear_error(tiny_data, tiny_features, tmp_path):
    from qin.errors import QinError

    with pytest.raises(QinError, match="cannot resume"):
        fit(tiny_config(tiny_data, tmp_path), load_features(tiny_features), tmp_path / "none", resume=True)


def test_warmup_ramps_the_learning_rate_then_lets_go() -> None:
    from qin.config import TrainConfig
    from qin.train import apply_warmup

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    cfg = TrainConfig(learning_rate=0.4, warmup_steps=4)
    seen = []
    for step in range(6):
        apply_warmup(optimizer, cfg, step)
        seen.append(optimizer.param_groups[0]["lr"])
        if step == 4:
            optimizer.param_groups[0]["lr"] = 0.2  # a plateau decay after the ramp must stick
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.2])
    optimizer.param_groups[0]["lr"] = 1.0
    apply_warmup(optimizer, TrainConfig(learning_rate=0.4), 0)  # no warm-up: the LR is left alone
    assert optimizer.param_groups[0]["lr"] == 1.0
