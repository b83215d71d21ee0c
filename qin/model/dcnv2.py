"""DCNv2 (Wang et al. 2021, FuxiCTR DCNv2 with model_structure 'parallel') as a tower over QIN's ASTA output.

    embeddings -> item vectors -> ASTA -> z0 = [likes ‖ views ‖ v_t ‖ p] -> DCNv2 tower -> logit

The explicit-interaction reference: QIN with its quadratic tower replaced by a DCNv2 tower, everything
before the tower unchanged (same z0 of width D = 2 d_e + 2 d_i, 1024 at d_e = 128).

DCNv2 tower, (B, D) -> (B, 1):
    cross:  x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l, l = 0 .. cross_layers - 1, W_l full rank (D x D), or
            with `cross_rank` r > 0 the DCNv2 paper's low-rank form W_l = U_l V_l^T (U_l, V_l: D x r)
    DNN:    per width of mlp_hidden Linear -> [BN] -> ReLU -> [Dropout], no output layer (width H_last)
    logit = Linear([x_L ‖ DNN(x_0)])   (width D + H_last)

Parameters of the tower: cross_layers (D^2 + D) (low-rank: cross_layers (2 D r + D)) + DNN + (D + H_last + 1).
"""

from __future__ import annotations

import torch
from torch import nn

from qin.model.mlp import MLP, Activation
from qin.model.qin import QIN


def cross_weight(width: int, rank: int) -> nn.Module:
    """x -> W x + b, W full rank (rank 0) or U V^T with U, V of width x rank. (B, D) -> (B, D)."""
    if rank == 0:
        return nn.Linear(width, width)
    # Why low rank: at a wide input (transformer_dcn's head reads 3,424 features at embedding 32) the
    # full-rank layers hold tens of millions of weights; the DCNv2 paper finds W's spectrum decays fast,
    # so a rank well below D keeps most of what the cross learns.
    return nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))


class CrossNetV2(nn.Module):
    """Cross network v2: x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l. (B, D) -> (B, D)."""

    def __init__(self, width: int, num_layers: int, rank: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(cross_weight(width, rank) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for linear in self.layers:
            x = x0 * linear(x) + x
        return x


class DCNv2Block(nn.Module):
    """Cross network and DNN side by side on the same input, outputs concatenated (FuxiCTR 'parallel').

    (B, D) -> (B, D + hidden[-1]).
    """

    def __init__(self, width: int, cross_layers: int, cross_rank: int, hidden: list[int], dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.cross = CrossNetV2(width, cross_layers, cross_rank)
        self.dnn = MLP(width, hidden, None, Activation.relu, dropout, batch_norm)
        self.output_dim = width + hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cross(x), self.dnn(x)], dim=-1)  # (B, D + H_last)


class DCNv2Tower(nn.Module):
    """DCNv2Block then Linear(D + H_last, 1): the DCNv2 'parallel' model's head. (B, D) -> (B, 1)."""

    def __init__(self, width: int, cross_layers: int, cross_rank: int, hidden: list[int], dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.block = DCNv2Block(width, cross_layers, cross_rank, hidden, dropout, batch_norm)
        self.output = nn.Linear(self.block.output_dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.output(self.block(z))


class DCNv2(QIN):
    """ASTA over the history (QIN's encoder, both paths), then a DCNv2 tower in place of the quadratic one."""

    def build_tower(self, width: int) -> nn.Module:
        cfg = self.cfg
        return DCNv2Tower(width, cfg.cross_layers, cfg.cross_rank, cfg.mlp_hidden, cfg.net_dropout,
                          cfg.batch_norm)
