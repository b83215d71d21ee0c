"""Quadratic towers, (B, D) -> (B, 1) logit: QIN's quadratic tower and the QNN-alpha tower, layer by layer.

Shapes use the notation of qin/model/base.py. The MLP tower lives in qin/model/mlp.py.
"""

from __future__ import annotations

import torch
from torch import nn

from qin.model.dropout import Dropout
from qin.model.mlp import Activation, make_activation


class QuadraticLayer(nn.Module):
    """One layer of QIN's quadratic tower (docs/model.md section 2.4); (B, D) -> (B, D).

    h = Dropout(W z + b) split into R chunks of D; y = z ⊙ sum_r h_r; y = Dropout(act(BN(y))); out = y + z.
    Summing the R chunks equals one D x D linear with summed weights; R still changes the parameter count,
    the xavier scale and the dropout noise, so it is kept as in the reference.
    """

    def __init__(self, width: int, num_row: int, dropout: float, batch_norm: bool,
                 activation: Activation) -> None:
        super().__init__()
        self.num_row = num_row
        self.linear = nn.Linear(width, num_row * width)
        self.branch_dropout = Dropout(dropout)
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.activation = make_activation(activation, width)
        self.dropout = Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Dropout(W z + b) (B, R D), then its R chunks summed (chunk r = outputs [r D, (r+1) D)): (B, D)
        h = self.branch_dropout.sum_chunks(self.linear(z), self.num_row)
        y = self.dropout(self.activation(self.norm(z * h)))  # (B, D)
        return y + z


class LayerTower(nn.Module):
    """Width-preserving layers in sequence, then Linear(D, 1): the shape of both quadratic towers.

    (B, D) -> (B, 1). Parameter names (`layers.<i>.*`, `output.*`) are what checkpoints hold.
    """

    def __init__(self, layers: list[nn.Module], width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output = nn.Linear(width, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            z = layer(z)
        return self.output(z)


class QuadraticTower(LayerTower):
    """QIN's tower: num_layers QuadraticLayers, then Linear(D, 1). (B, D) -> (B, 1)."""

    def __init__(self, width: int, num_layers: int, num_row: int, dropout: float, batch_norm: bool,
                 activation: Activation) -> None:
        super().__init__([QuadraticLayer(width, num_row, dropout, batch_norm, activation)
                          for _ in range(num_layers)], width)


class QNNAlphaLayer(nn.Module):
    """One QNN-alpha layer (docs/model.md section 3): mid-activation branch, multi-head Khatri-Rao product.

    g = Dropout(ReLU(BN(W z + b))) reshaped (H, R, d); head h of z = slice h of every field (fields of width
    E); y_h = z_h ⊙ sum_r g_{h,r}; out = Dropout(N([y_1 ‖ ... ‖ y_H]) + z).  (B, D) -> (B, D).
    N is the identity (published) or, with product_norm, BatchNorm1d(D).

    The reference's quirk is kept: the product comes out head-major while the residual z is field-major,
    so for H > 1 they are added under a fixed permutation (aligned only when H = 1).

    Why product_norm (not the published math): the branch BN rescales g by a batch statistic only, so y
    stays quadratic in each row's scale and L layers compound that into a degree-2^L polynomial; a BN on
    y, where QIN's tower has it, caps what each layer adds to the residual stream at O(1) per unit.
    """

    def __init__(self, width: int, field_dim: int, num_row: int, num_heads: int, dropout: float,
                 batch_norm: bool, product_norm: bool = False) -> None:
        super().__init__()
        if width % field_dim or field_dim % num_heads:
            raise ValueError(f"QNN-alpha needs D ({width}) = fields x E ({field_dim}) "
                             f"and H ({num_heads}) dividing E")
        self.field_dim, self.num_row, self.num_heads = field_dim, num_row, num_heads
        self.linear = nn.Linear(width, num_row * width)
        self.norm = nn.BatchNorm1d(num_row * width) if batch_norm else nn.Identity()
        self.branch_dropout = Dropout(dropout)
        # Identity when off: the published layer, with the same parameters and state_dict keys.
        self.product_norm = nn.BatchNorm1d(width) if product_norm else nn.Identity()
        self.dropout = Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, width = z.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        fields = width // self.field_dim
        g = self.branch_dropout(torch.relu(self.norm(self.linear(z))))  # (B, R D)
        g = g.view(batch, heads, self.num_row, head_dim).sum(dim=2)  # (B, H, d): row-major split, sum over R
        z_heads = z.view(batch, fields, heads, self.field_dim // heads).transpose(1, 2)  # (B, H, F, E / H)
        z_heads = z_heads.reshape(batch, heads, head_dim)  # (B, H, d): head h = slice h of every field
        y = self.product_norm((z_heads * g).reshape(batch, width))  # (B, D) head-major; BN is per unit
        return self.dropout(y + z)  # residual field-major: the reference's permutation when H > 1


class QNNAlphaTower(LayerTower):
    """num_layers QNNAlphaLayers, then Linear(D, 1). (B, D) -> (B, 1).

    Published (bounded=False): no activation or normalisation outside the layers' branches.

    bounded=True (`model.qnn_alpha_bounded`, not the published math) makes the tower's scale independent
    of its input's: QNN-alpha was designed for small, regularised field embeddings, but here z0 holds raw
    multimodal projections and ASTA's output p, whose unnormalised ReLU weights let a row's norm reach
    20x the median. Each layer is quadratic in its row, so such a row's logit grows like its norm^(2^L).
    Two normalisations, both off the published path:
      - input: every field of width E scaled to zero mean, unit variance within the row (GroupNorm with
        one group per field, per-unit affine), so each field enters like a QNN field embedding and no
        row or field can dominate; per row, so training and inference see the same thing;
      - product: BatchNorm on each layer's Khatri-Rao product (QNNAlphaLayer product_norm), as QIN's
        tower does, so a layer adds an O(1) term instead of multiplying the scale.
    Neither alone is enough (1 epoch of `small` synthetic data at E = 128, valid AUC): published .716,
    product BN only .760, input norm only .839 with logits still up to 1e6, both .869. One LayerNorm over
    all of z0 instead of per field: .687 (a large p then squashes the other fields).
    """

    def __init__(self, width: int, field_dim: int, num_layers: int, num_row: int, num_heads: int,
                 dropout: float, batch_norm: bool, bounded: bool = False) -> None:
        super().__init__([QNNAlphaLayer(width, field_dim, num_row, num_heads, dropout, batch_norm,
                                        product_norm=bounded)
                          for _ in range(num_layers)], width)
        # Identity when off: the published tower, with the same parameters and state_dict keys.
        self.input_norm = nn.GroupNorm(width // field_dim, width) if bounded else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z0 (B, D) -> logit (B, 1)."""
        return super().forward(self.input_norm(z))  # GroupNorm reads (B, D) as D channels in F groups
