"""Activations (ReLU, PReLU, Dice, identity) and FuxiCTR's MLP block.

The MLP is both a tower (DIN, QIN-MLP, the mean-pooled baseline, one of QIN+'s two towers) and DIN's
attention scorer; the activations are shared with QIN's quadratic tower. Shapes use the notation of
qin/model/base.py.
"""

from __future__ import annotations

import enum
from typing import assert_never

import torch
from torch import nn

from qin.model.dropout import Dropout


class Activation(enum.StrEnum):
    relu = "relu"
    prelu = "prelu"  # nn.PReLU(): one shared slope, initial value 0.25 (QIN's tower)
    dice = "dice"  # DIN's data-adaptive activation (FuxiCTR `Dice`)
    identity = "identity"


def make_activation(kind: Activation, width: int) -> nn.Module:
    """One activation module for inputs of `width` features (only Dice uses the width)."""
    match kind:
        case Activation.relu:
            return nn.ReLU()
        case Activation.prelu:
            return nn.PReLU()
        case Activation.dice:
            return Dice(width)
        case Activation.identity:
            return nn.Identity()
        case _:
            assert_never(kind)


class Dice(nn.Module):
    """FuxiCTR's Dice: p = sigmoid(BN(x)), out = p x + (1 - p) alpha x. (N, width) -> (N, width)."""

    def __init__(self, width: int, eps: float = 1e-9) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width, affine=False, eps=eps, momentum=0.01)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.bn(x))
        return gate * x + (1 - gate) * self.alpha * x


class MLP(nn.Module):
    """FuxiCTR's MLP_Block: per hidden width Linear -> [BN] -> activation -> [Dropout]; then Linear -> out.

    (N, input_dim) -> (N, output_dim); output_dim=None ends at the last hidden block, (N, hidden[-1]), as
    FuxiCTR's MLP_Block with output_dim=None (the DNN beside a cross network).
    """

    def __init__(self, input_dim: int, hidden: list[int], output_dim: int | None, activation: Activation,
                 dropout: float, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip([input_dim, *hidden[:-1]], hidden, strict=True):
            layers.append(nn.Linear(width_in, width_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(make_activation(activation, width_out))
            if dropout > 0:
                layers.append(Dropout(dropout))
        if output_dim is not None:
            layers.append(nn.Linear(hidden[-1] if hidden else input_dim, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
