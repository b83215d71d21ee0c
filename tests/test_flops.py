"""Counted FLOPs per sample (qin/flops.py): hand-derived counts, batch-size (in)dependence, side effects, and
the measured matmul peak. No timing is asserted: this machine is shared, speed is never a test."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch
from qin.config import ModelConfig, ModelName, TrainConfig
from qin.flops import FlopCount, measured_peak_flops, train_flops_per_sample
from qin.model import CTRModel
from tests.test_model import VOCAB, make_batch, tiny_model


class LinearStack(CTRModel):
    """A pure MLP on the one-hot likes level: Linear(11, 16) -> ReLU -> Linear(16, 4) -> ReLU -> Linear(4, 1).

    Nothing in it depends on the batch beyond its rows, and its FLOPs are easy to derive by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cfg = ModelConfig()
        self.net = nn.Sequential(nn.Linear(VOCAB.levels, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(),
                                 nn.Linear(4, 1))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.net(F.one_hot(batch.likes_level, VOCAB.levels).float()).squeeze(-1)


def doubled(batch: Batch) -> Batch:
    """The same rows twice: twice the rows, the same distinct items."""
    assert batch.label is not None
    return Batch(*(torch.cat([t, t]) for t in (batch.target_item, batch.history, batch.likes_level,
                                               batch.views_level, batch.label)))


def test_linear_stack_matches_hand_count() -> None:
    count = train_flops_per_sample(LinearStack(), make_batch(rows=12))
    # Forward: 2 in out per row and Linear (multiply-adds), the bias adds and ReLUs are not counted.
    forward = 2 * (11 * 16 + 16 * 4 + 4 * 1)
    assert count.forward == forward == count.inference == 488
    # Backward: every weight gradient (2 in out) again, and the input gradient of each layer whose input
    # needs one (2 in out): not the first, whose input is a one-hot of data. So just under 2x forward.
    assert count.backward == forward + 2 * (16 * 4 + 4 * 1) == 624
    assert count.train == count.forward + count.backward
    assert count.batch_size == 12 and count.history_slots == 10


def test_mean_pool_mlp_per_slot_matches_hand_count() -> None:
    # Tiny dims (tests/test_model.py): d_e = 8, multimodal M = 16, d_i = 3 d_e = 24, L = 10 slots,
    # MLP 64 -> 16 -> 8 -> 1 on z0 = [likes ‖ views ‖ v_t ‖ mean] (2 d_e + 2 d_i = 64).
    model = tiny_model(ModelName.mean_pool_mlp, unique_items=False)
    count = train_flops_per_sample(model, make_batch(rows=16))
    projection = 2 * 16 * 8 * (10 + 1)  # W_mm m on every slot and the target: B (L + 1) rows of M -> d_e
    pooling = 2 * 10 * 24  # the mean as a (1, L) x (L, d_i) bmm per row
    mlp = 2 * (64 * 16 + 16 * 8 + 8 * 1)
    assert count.forward == count.inference == projection + pooling + mlp
    # Backward: W_mm's weight gradient only (its input is the frozen multimodal table), the history's
    # gradient through the bmm (the weights come from the mask), weight and input gradients of the MLP.
    assert count.backward == projection + pooling + 2 * mlp


def test_train_counts_more_than_forward() -> None:
    batch = make_batch(rows=16)
    for name in ModelName:
        count = train_flops_per_sample(tiny_model(name), batch)
        assert count.forward > 0, name
        assert count.train > count.forward, name
        assert 1.5 * count.forward < count.backward <= 2 * count.forward, name


def test_per_sample_count_independent_of_batch_size_without_unique_items() -> None:
    small, large = make_batch(seed=1, rows=8), make_batch(seed=2, rows=48)
    assert train_flops_per_sample(LinearStack(), small).train == train_flops_per_sample(
        LinearStack(), large).train
    model = tiny_model(ModelName.qin, unique_items=False)  # the per-slot path: every slot projected
    first, second = train_flops_per_sample(model, small), train_flops_per_sample(model, large)
    assert (first.forward, first.backward) == (second.forward, second.backward)


def test_unique_items_count_depends_on_distinct_items() -> None:
    # The fast path projects each distinct item once per batch: doubling the rows with the same items
    # leaves that part unchanged, so it costs less per sample. The per-slot path does not care.
    batch = make_batch(rows=16)
    fast = tiny_model(ModelName.qin)
    once, twice = train_flops_per_sample(fast, batch), train_flops_per_sample(fast, doubled(batch))
    assert once.unique_item_ids == twice.unique_item_ids and twice.batch_size == 2 * once.batch_size
    assert twice.forward < once.forward and twice.backward < once.backward
    per_slot = tiny_model(ModelName.qin, unique_items=False)
    assert train_flops_per_sample(per_slot, batch).train == train_flops_per_sample(per_slot,
                                                                                  doubled(batch)).train
    assert once.train < train_flops_per_sample(per_slot, batch).train


def test_transformer_attention_is_counted_when_scoring() -> None:
    # Scoring runs CPU attention kernels (and nn.MultiheadAttention's fused fast path) that torch's
    # counter has no formula for; qin.flops supplies them, so scoring counts what the training forward does.
    batch = make_batch(rows=16)
    for name in (ModelName.transformer_dcn, ModelName.din_sa):
        count = train_flops_per_sample(tiny_model(name), batch)
        assert count.inference == count.forward, name
    assert torch.backends.mha.get_fastpath_enabled()  # switched back on


def test_regularizers_and_self_ensemble() -> None:
    batch = make_batch(rows=16)
    model = tiny_model(ModelName.qin)
    regularized = TrainConfig(embedding_regularizer=1e-3, net_regularizer=1e-3)
    # The L2 terms are elementwise: in the graph, but no counted FLOPs.
    assert train_flops_per_sample(model, batch, regularized) == train_flops_per_sample(model, batch)
    # QNN-alpha's training loss runs its tower twice; scoring runs it once.
    alpha = train_flops_per_sample(tiny_model(ModelName.qnn_alpha), batch)
    assert alpha.forward > alpha.inference


def test_counting_leaves_model_and_rng_alone() -> None:
    model = tiny_model(ModelName.qin)
    model.train()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    rng = torch.get_rng_state()
    count = train_flops_per_sample(model, make_batch(rows=16))
    assert isinstance(count, FlopCount)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())  # BN stats too
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    assert torch.equal(torch.get_rng_state(), rng)
    record = count.as_dict()
    assert record["train"] == count.train and record["unique_item_ids"] == count.unique_item_ids


def test_measured_peak_flops_cpu() -> None:
    peak = measured_peak_flops(torch.device("cpu"), torch.float32, size=128, repeats=2)
    assert math.isfinite(peak) and peak > 0


def test_measured_peak_flops_refuses_empty_sizes() -> None:
    with pytest.raises(ValueError, match="positive"):
        measured_peak_flops(torch.device("cpu"), torch.float32, size=0)
