"""qin.model.dropout: nn.Dropout's math with a cheaper CPU mask."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qin.model.dropout import Dropout, keep_mask


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.1, 0.999])
def test_each_half_of_the_word_keeps_with_probability_q(keep):
    """Even positions come from the low 32 bits of a word, odd ones from the high bits (31 random): a wrong
    threshold for either half shows up as a biased keep rate on that half."""
    torch.manual_seed(0)
    mask = keep_mask(torch.Size([2_000_000]), keep)
    assert mask.dtype == torch.bool
    for half in (mask[0::2], mask[1::2]):
        n = half.numel()
        sd = math.sqrt(keep * (1 - keep) / n)
        assert abs(half.float().mean().item() - keep) < 5 * sd


def test_mask_elements_are_uncorrelated():
    torch.manual_seed(1)
    mask = keep_mask(torch.Size([1_000_001]), 0.5).float()  # odd count: the last word is half used
    assert mask.numel() == 1_000_001
    centred = mask - mask.mean()
    for lag in (1, 2, 3):  # neighbours within a word (lag 1) and across words
        correlation = (centred[:-lag] * centred[lag:]).mean() / centred.pow(2).mean()
        assert abs(correlation.item()) < 0.01


def test_training_output_and_gradient_are_dropout():
    torch.manual_seed(2)
    x = torch.randn(64, 257, requires_grad=True)
    layer = Dropout(0.25)
    y = layer(x)
    kept = y != 0
    assert 0.65 < kept.float().mean().item() < 0.85
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


def test_mean_is_preserved_and_masks_differ_between_calls():
    torch.manual_seed(3)
    x = torch.ones(400_000)
    layer = Dropout(0.1)
    first, second = layer(x), layer(x)
    assert abs(first.mean().item() - 1.0) < 0.005
    assert not torch.equal(first, second)


def test_deterministic_per_seed_and_identity_in_eval():
    x = torch.randn(33, 17)
    layer = Dropout(0.5)
    torch.manual_seed(4)
    a = layer(x)
    torch.manual_seed(4)
    b = layer(x)
    assert torch.equal(a, b)
    layer.eval()
    assert layer(x) is x
    assert Dropout(0.0)(x) is x


def test_edge_probabilities_and_bf16():
    x = torch.randn(8, 8)
    assert torch.count_nonzero(Dropout(1.0)(x)) == 0  # nn.Dropout(1.0): everything dropped
    with pytest.raises(ValueError, match="between 0 and 1"):
        Dropout(1.5)
    y = Dropout(0.5)(x.bfloat16())
    assert y.dtype == torch.bfloat16


def test_models_use_it_in_place_of_nn_dropout():
    from qin.model.mlp import Activation
    from qin.model.towers import QuadraticLayer

    layer = QuadraticLayer(width=4, num_row=2, dropout=0.1, batch_norm=True, activation=Activation.prelu)
    assert not any(type(m) is nn.Dropout for m in layer.modules())
    assert sum(isinstance(m, Dropout) for m in layer.modules()) == 2


def test_sum_chunks_is_dropout_then_the_chunk_sum():
    """QIN's branch: Dropout of (B, R D), then the R column blocks summed; the same mask draws as Dropout."""
    x = torch.randn(6, 3 * 5, dtype=torch.float64, requires_grad=True)
    layer = Dropout(0.3)
    torch.manual_seed(8)
    fused = layer.sum_chunks(x, 3)
    torch.manual_seed(8)
    expected = layer(x).view(6, 3, 5).sum(dim=1)
    torch.testing.assert_close(fused, expected)
    weights = torch.randn(6, 5, dtype=torch.float64)
    (grad_fused,) = torch.autograd.grad((fused * weights).sum(), x)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad_fused, grad_expected)
    layer.eval()
    torch.testing.assert_close(layer.sum_chunks(x, 3), x.view(6, 3, 5).sum(dim=1))
