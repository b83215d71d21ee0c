"""The CPU speed paths compute what the plain path computes: bf16 autocast (train.cpu_bf16) to bf16 tolerance,
the fused Adam to float rounding. (The CPU dropout mask is tested in test_dropout.py, the single-request path
in test_serve.py.)"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from qin.config import Config, ModelName, TrainConfig
from qin.runtime import autocast_context
from qin.train import make_optimizer, make_train_step
from tests.test_model import make_batch, tiny_cfg, tiny_model

CPU = torch.device("cpu")


def train_cfg(**changes) -> TrainConfig:
    return TrainConfig().model_copy(update=changes)


@pytest.mark.parametrize("name", [ModelName.qin, ModelName.din, ModelName.dcnv2])
def test_cpu_bf16_logits_match_float32_to_bf16_tolerance(name):
    model = tiny_model(name).eval()
    batch = make_batch()
    with torch.no_grad():
        plain = model(batch)
        with autocast_context(CPU, train_cfg(cpu_bf16=True)):
            fast = model(batch)
        with autocast_context(CPU, train_cfg(cpu_bf16=False)):
            again = model(batch)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)  # off: no autocast at all
    assert not torch.equal(fast, plain)  # on: the matmuls did run in bf16
    # bf16 keeps 8 significant bits: relative error ~2^-8 per matmul, a few layers deep
    torch.testing.assert_close(fast.float(), plain, rtol=0.05, atol=0.05 * plain.abs().max().item())


def test_cpu_bf16_training_steps_track_float32():
    """Five training steps with and without bf16 autocast, same seed, same batches (so the same dropout
    masks): the losses agree to bf16 tolerance, and the two runs' weights end closer to each other than
    training moved them."""
    batches = [make_batch(seed) for seed in range(5)]
    losses, weights = {}, {}
    for bf16 in (False, True):
        model = tiny_model(ModelName.qin)
        cfg = Config.from_dict({"model": tiny_cfg(ModelName.qin).model_dump(mode="json"),
                                "train": {"cpu_bf16": bf16, "learning_rate": 1e-3}})
        optimizer = make_optimizer(model, cfg.train)
        step = make_train_step(model, model, optimizer, cfg, CPU)
        torch.manual_seed(7)
        losses[bf16] = torch.stack([step(batch) for batch in batches])
        weights[bf16] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(losses[True], losses[False])
    # a few % on a tiny model: bf16's 2^-8 relative error per matmul, through products of two layers
    torch.testing.assert_close(losses[True], losses[False], rtol=0.1, atol=0.0)
    start = torch.cat([p.detach().flatten() for p in tiny_model(ModelName.qin).parameters()])
    moved = weights[False] - start
    drift = (weights[True] - weights[False]).norm().item()
    assert 0 < drift < 0.5 * moved.norm().item()  # less than the training itself moved them


def test_fused_adam_matches_the_default_adam():
    model = tiny_model(ModelName.qin)
    twin = copy.deepcopy(model)
    fused = make_optimizer(model, train_cfg(learning_rate=1e-2))
    default = torch.optim.Adam(twin.parameters(), lr=1e-2)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    for seed in range(3):
        for m, opt in ((model, fused), (twin, default)):
            torch.manual_seed(seed)
            m.loss(make_batch(seed))[0].backward()
            opt.step()
            opt.zero_grad()
    for (key, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        # float rounding only: ~1e-6 after three steps of size ~lr = 1e-2 (other betas or eps: ~1e-3)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=key)


def test_one_request_follows_the_runs_cpu_bf16():
    """A run trained with train.cpu_bf16 is served in bf16 too: the fast single-request path then agrees with
    the float32 model to bf16 tolerance; without it, to float32 rounding."""
    from pathlib import Path

    from qin.predict import LoadedRun, one_request
    from tests.test_serve import TOLERANCE, reference, requests, served

    model = served(ModelName.qin)
    for bf16 in (False, True):
        cfg = Config.from_dict({"train": {"cpu_bf16": bf16}})
        run = LoadedRun(run_dir=Path("."), config=cfg, model=model, features=None, device=CPU, checkpoint={})
        for case, request in requests().items():
            expected = reference(model, *request)
            scores = one_request(run, *request)
            if bf16:
                assert not np.allclose(scores, expected, **TOLERANCE), case
                np.testing.assert_allclose(scores, expected, rtol=0.05, atol=0.02, err_msg=case)
            else:
                np.testing.assert_allclose(scores, expected, **TOLERANCE, err_msg=case)
