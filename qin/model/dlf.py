"""DLF (Wang et al., SIGIR 2025: Dynamic Low-Order-Aware Fusion) as a tower over QIN's ASTA output.

    embeddings -> item vectors -> ASTA -> z0 = [likes ‖ views ‖ v_t ‖ p] -> F tokens -> DLF layers -> head

The interaction block of the table (docs/model.md section 9.4): QIN with its quadratic tower replaced by
DLF, everything before the tower unchanged. z0 is F = D / d_e tokens of width d (= d_e): likes, views, the
target's id, tags and multimodal parts, and ASTA's output in the same three parts (F = 8). The authors'
code (github.com/USTC-StarTeam/DLF) is the source of the structure and the sizes.

Notation (see qin/model/base.py): B batch, F input tokens, N tokens into a layer (F at the first layer),
d token width, t tokens per block (`dlf_tokens`), r FM rank (`dlf_rank`), h hidden width (`dlf_hidden`).
One layer, (B, N, d) tokens x and the input tokens x0 (B, F, d) -> (B, 4t, d):
    x0' = x0 mixed to N tokens (a learned F x N map; identity at the first layer, where N = F)
    linear     t tokens: a learned N x t map across tokens (explicit, first order)            RLI
    fm(x)      P = x^T W_r (B, d, r); x P (B, N, r): inner products of every token with r   RLI
               mixtures of the tokens (second order); flattened, LayerNorm, MLP [h] -> t tokens
    fm(x0)     the same with x0' P: each token of the input against mixtures of x, so the    RLI
               low-order signal of the input reaches every layer (the "residual-aware" part)
    attention  unscaled multi-head dot-product self-attention over the N tokens, flattened,   NAF
               LayerNorm, MLP [h] -> t tokens: every layer fuses all the tokens of the
               previous one, explicit and implicit alike
    out = LayerNorm_d([fm(x) ‖ fm(x0) ‖ linear ‖ attention] + residual(x)), residual = a learned N x 4t
          map across tokens (identity when N = 4t)
Head: flatten (B, 4t d) -> MLP [h] -> 1.

Where the authors' code has several variants, this is its `DLF_att_cross` (attention over every token of
the previous layer); its plain `DLF` has no attention block, so no NAF. MLPs are FuxiCTR's (Linear ->
BN -> ReLU -> Dropout, then Linear), as the authors' with batch norm on; token maps are initialised
kaiming-uniform as theirs, the Linears xavier-normal by `init_weights`.

Parameters of one layer (N in, F input, 4t out):
    [F != N] F N + N t + 2 (N r + 2 N r + mlp(N r)) + 3 d^2 + 2 N d + mlp(N d) + [N != 4t] 4 N t + 2 d
    where mlp(w) = w h + h + 2 h + h t d + t d;  head: 4 t d h + h + 2 h + h + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qin.config import ModelConfig
from qin.model.dropout import Dropout
from qin.model.mlp import MLP, Activation
from qin.model.qin import QIN


class TokenMap(nn.Module):
    """A learned linear map across tokens, the same for every feature: (B, N_in, d) -> (B, N_out, d)."""

    def __init__(self, tokens_in: int, tokens_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens_in, tokens_out))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bnd,no->bod", x, self.weight)


def token_mlp(width: int, hidden: int, tokens_out: int, token_width: int, dropout: float,
              batch_norm: bool) -> MLP:
    """(B, width) -> (B, tokens_out * token_width): one hidden layer of `hidden` (the authors' 2 layers)."""
    return MLP(width, [hidden], tokens_out * token_width, Activation.relu, dropout, batch_norm)


class FactorizationBlock(nn.Module):
    """Second-order tokens: (B, N, d) x and (B, N, d) y -> (B, t, d).

    P = x^T W (B, d, r) mixes x's tokens r ways; y P (B, N, r) is every token of y against every mixture.
    y = x is the FM block of the authors' code, y = x0' its "x0" twin.
    """

    def __init__(self, tokens_in: int, tokens_out: int, width: int, rank: int, hidden: int, dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens_in, rank))
        nn.init.kaiming_uniform_(self.weight)
        self.norm = nn.LayerNorm(tokens_in * rank)
        self.mlp = token_mlp(tokens_in * rank, hidden, tokens_out, width, dropout, batch_norm)
        self.tokens_out, self.width = tokens_out, width

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mixtures = torch.einsum("bnd,nr->bdr", x, self.weight)  # (B, d, r)
        products = torch.bmm(y, mixtures).flatten(1)  # (B, N r)
        return self.mlp(self.norm(products)).view(-1, self.tokens_out, self.width)  # (B, t, d)


class TokenAttention(nn.Module):
    """NAF: multi-head self-attention over the tokens, then flatten, LayerNorm, MLP. (B, N, d) -> (B, t, d).

    The scores are not divided by sqrt(d / heads): the authors' default (use_scale: False).
    """

    def __init__(self, tokens_in: int, tokens_out: int, width: int, heads: int, hidden: int, dropout: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.w_q = nn.Linear(width, width, bias=False)
        self.w_k = nn.Linear(width, width, bias=False)
        self.w_v = nn.Linear(width, width, bias=False)
        self.heads = heads
        self.dropout = Dropout(dropout)
        self.norm = nn.LayerNorm(tokens_in * width)
        self.mlp = token_mlp(tokens_in * width, hidden, tokens_out, width, dropout, batch_norm)
        self.tokens_out, self.width = tokens_out, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, tokens, _ = x.shape

        def split(projected: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, heads, N, d / heads)
            return projected.view(rows, tokens, self.heads, -1).transpose(1, 2)

        query, key, value = split(self.w_q(x)), split(self.w_k(x)), split(self.w_v(x))
        weights = self.dropout(F.softmax(query @ key.transpose(-1, -2), dim=-1))  # (B, heads, N, N)
        mixed = (weights @ value).transpose(1, 2).flatten(1)  # (B, N d)
        return self.mlp(self.norm(mixed)).view(rows, self.tokens_out, self.width)  # (B, t, d)


class DLFLayer(nn.Module):
    """One DLF layer (RLI's linear and two FM blocks, NAF's attention): (B, N, d), (B, F, d) -> (B, 4t, d)."""

    def __init__(self, input_tokens: int, tokens_in: int, width: int, tokens: int, rank: int, hidden: int,
                 heads: int, dropout: float, batch_norm: bool) -> None:
        super().__init__()
        tokens_out = 4 * tokens
        self.input_map = TokenMap(input_tokens, tokens_in) if input_tokens != tokens_in else None
        self.linear = TokenMap(tokens_in, tokens)
        self.fm = FactorizationBlock(tokens_in, tokens, width, rank, hidden, dropout, batch_norm)
        self.fm_input = FactorizationBlock(tokens_in, tokens, width, rank, hidden, dropout, batch_norm)
        self.attention = TokenAttention(tokens_in, tokens, width, heads, hidden, dropout, batch_norm)
        self.residual = TokenMap(tokens_in, tokens_out) if tokens_in != tokens_out else None
        self.norm = nn.LayerNorm(width)
        self.tokens_out = tokens_out

    def forward(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        x0 = x0 if self.input_map is None else self.input_map(x0)  # (B, N, d)
        blocks = [self.fm(x, x), self.fm_input(x, x0), self.linear(x), self.attention(x)]  # 4 x (B, t, d)
        residual = x if self.residual is None else self.residual(x)  # (B, 4t, d)
        return self.norm(torch.cat(blocks, dim=1) + residual)  # (B, 4t, d)


class DLFTower(nn.Module):
    """z0 as tokens, `layers` DLF layers, then the head MLP. (B, F d) -> (B, 1)."""

    def __init__(self, width: int, token_width: int, cfg: ModelConfig) -> None:
        super().__init__()
        if width % token_width:
            raise ValueError(f"DLF needs the tower width ({width}) to be a multiple of the token width "
                             f"({token_width})")
        self.input_tokens, self.token_width = width // token_width, token_width
        tokens_in = self.input_tokens
        self.layers = nn.ModuleList()
        for _ in range(cfg.dlf_layers):
            layer = DLFLayer(self.input_tokens, tokens_in, token_width, cfg.dlf_tokens, cfg.dlf_rank,
                             cfg.dlf_hidden, cfg.dlf_heads, cfg.net_dropout, cfg.batch_norm)
            self.layers.append(layer)
            tokens_in = layer.tokens_out
        self.head = MLP(tokens_in * token_width, [cfg.dlf_hidden], 1, Activation.relu, cfg.net_dropout,
                        cfg.batch_norm)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x0 = z.view(-1, self.input_tokens, self.token_width)  # (B, F, d)
        x = x0
        for layer in self.layers:
            x = layer(x, x0)  # (B, 4t, d)
        return self.head(x.flatten(1))  # (B, 1)


class DLF(QIN):
    """ASTA over the history (QIN's encoder, both paths), then a DLF tower in place of the quadratic one."""

    def build_tower(self, width: int) -> nn.Module:
        return DLFTower(width, self.cfg.embedding_dim, self.cfg)
