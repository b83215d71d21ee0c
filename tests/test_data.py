"""Batches are slices/gathers of the feature arrays; item tables and their optional normalisation."""

from __future__ import annotations

import numpy as np
import torch

from qin.config import MMNormalize
from qin.data import SplitTensors, epoch_order, item_tables_of, iterate_batches, vocab_of
from qin.features.io import load_features


def test_batches_cover_the_split_in_order(tiny_features):
    split = SplitTensors.from_arrays(load_features(tiny_features).split("valid"))
    batches = list(iterate_batches(split, 300))
    assert [b.size for b in batches] == [300, 300, 300, 100]
    assert torch.equal(torch.cat([b.target_item for b in batches]), split.item_id.long())
    assert batches[0].history.dtype == torch.int64 and batches[0].label.dtype == torch.float32


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert torch.equal(epoch_order(100, 1, 0), epoch_order(100, 1, 0))
    assert not torch.equal(epoch_order(100, 1, 0), epoch_order(100, 1, 1))
    assert sorted(epoch_order(100, 1, 3).tolist()) == list(range(100))


def test_start_batch_skips_exactly_the_first_batches(tiny_features):
    split = SplitTensors.from_arrays(load_features(tiny_features).split("train"))
    order = epoch_order(split.rows, 5, 0)
    whole = list(iterate_batches(split, 1000, order))
    resumed = list(iterate_batches(split, 1000, order, start_batch=3))
    assert len(resumed) == len(whole) - 3
    assert all(torch.equal(a.target_item, b.target_item) for a, b in zip(whole[3:], resumed, strict=True))


def test_item_tables_and_l2_normalisation(tiny_features):
    features = load_features(tiny_features)
    raw = item_tables_of(features)
    assert raw.tags.shape == (vocab_of(features).items, 5) and raw.mm_emb.dtype == torch.float32
    np.testing.assert_array_equal(raw.mm_emb.numpy(), np.asarray(features.item_emb))
    unit = item_tables_of(features, MMNormalize.l2)
    norms = unit.mm_emb.norm(dim=1)
    assert torch.all(norms[0] == 0)  # the padding row stays zero
    assert torch.allclose(norms[1:], torch.ones_like(norms[1:]), atol=1e-5)
    # same direction as the raw vector
    cosine = torch.nn.functional.cosine_similarity(unit.mm_emb[1:], raw.mm_emb[1:], dim=1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)
