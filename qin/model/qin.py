"""QIN (QIN_variety_v9, docs/model.md section 2) and its ablations. Read top to bottom: the data flow is

    embeddings -> item vectors (target + history) -> ASTA -> z0 = [likes ‖ views ‖ v_t ‖ p] -> tower -> logit

Notation (see qin/model/base.py): B batch, L history slots, U unique items in the batch, d_e field width,
d_i = 3 d_e item vector width, A attention width (2 d_i by default), D = 2 d_e + 2 d_i tower width (1024),
R rows per quadratic layer.

Reference configuration (ModelConfig defaults): 31,244,293 parameters with R = 4, 27,045,893 with R = 3.

Each ablation, and the mean-pooled MLP baseline, is a small subclass that overrides one builder (or, for
"no ASTA", the encoder): no flags in `forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch, ItemTables, Vocab
from qin.config import ModelConfig
from qin.model.attention import HistoryPooling, MeanPooling, SoftmaxTargetAttention, TargetAttention
from qin.model.base import CTRModel, init_weights
from qin.model.embedding import FeatureEmbedding
from qin.model.mlp import MLP, Activation
from qin.model.towers import QuadraticTower


class QIN(CTRModel):
    """Quadratic Interest Network: ASTA over the history, then QIN's quadratic tower."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, items: ItemTables) -> None:
        super().__init__()
        self.cfg = cfg
        d_e = cfg.embedding_dim
        # The multimodal part is projected to d_e, so an item vector is 3 fields of width d_e.
        self.embedding = FeatureEmbedding(vocab, items, d_e, mm_out_dim=d_e, level_zero=cfg.level_zero)
        item_dim = self.embedding.items.output_dim  # d_i = 3 d_e
        self.attention = self.build_attention(item_dim, cfg.attention_dim or 2 * item_dim)
        width = self.embedding.fields_dim + item_dim + (item_dim if self.attention is not None else 0)
        self.tower = self.build_tower(width)  # D = 256 + 384 + 384 = 1024 in the reference
        init_weights(self)

    # -- builders: the one thing an ablation overrides ------------------------------------------------------

    def build_attention(self, item_dim: int, attention_dim: int) -> HistoryPooling | None:
        return TargetAttention(item_dim, attention_dim)

    def build_tower(self, width: int) -> nn.Module:
        cfg = self.cfg
        return QuadraticTower(width, cfg.num_layers, cfg.num_row, cfg.net_dropout, cfg.batch_norm,
                              Activation.prelu)

    # -- data flow -------------------------------------------------------------------------------------------

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything before the tower.

        Args: batch with target_item (B,), history (B, L), likes_level/views_level (B,).
        Returns: z0 (B, D) = [likes ‖ views ‖ v_t ‖ p], attention weights alpha (B, L).
        """
        assert self.attention is not None  # only QINNoASTA builds none, and it overrides encode()
        fields = self.embedding.fields(batch)  # (B, 2 d_e)
        mask = batch.history != 0  # (B, L), True = real item
        if self.cfg.unique_items:
            items, target_index, history_index = self.embedding.items.encode_unique(
                batch.target_item, batch.history)  # (U, d_i), (B,), (B, L)
            target = F.embedding(target_index, items)  # (B, d_i)
            interest, alpha = self.attention.forward_unique(target, items, history_index, mask)  # (B, d_i)
        else:
            # The reference: B (L + 1) item vectors. Its padded slots carry W_mm m_0 (row 0 of the
            # multimodal table); the mask zeroes their weight, so both paths give the same result.
            target, history = self.embedding.items.encode_slots(batch.target_item, batch.history)
            interest, alpha = self.attention(target, history, mask)  # (B, d_i), (B, L)
        return torch.cat([fields, target, interest], dim=-1), alpha  # (B, D)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,), no sigmoid."""
        z, _ = self.encode(batch)  # (B, D)
        return self.tower(z).squeeze(-1)  # (B,)

    def attention_weights(self, batch: Batch) -> torch.Tensor | None:
        """ASTA weight per history slot (B, L); 0 on padding."""
        return self.encode(batch)[1]


class QINSoftmax(QIN):
    """Ablation: ASTA weights from a softmax over the real history items instead of a ReLU."""

    def build_attention(self, item_dim: int, attention_dim: int) -> HistoryPooling | None:
        return SoftmaxTargetAttention(item_dim, attention_dim)


class QINNoASTA(QIN):
    """Ablation: no attention; the tower sees z0 = [likes ‖ views ‖ v_t] (D = 640 by default)."""

    def build_attention(self, item_dim: int, attention_dim: int) -> HistoryPooling | None:
        return None

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns z0 (B, 2 d_e + d_i) and no attention weights; the history is not read."""
        target = self.embedding.items(batch.target_item)  # (B, d_i)
        return torch.cat([self.embedding.fields(batch), target], dim=-1), None


class QINMLP(QIN):
    """Ablation: an MLP (Linear -> BN -> ReLU -> Dropout per width of cfg.mlp_hidden) in place of the QNN."""

    def build_tower(self, width: int) -> nn.Module:
        cfg = self.cfg
        return MLP(width, cfg.mlp_hidden, 1, Activation.relu, cfg.net_dropout, cfg.batch_norm)


class QINNoPReLU(QIN):
    """Ablation: the quadratic tower with the identity in place of its PReLU."""

    def build_tower(self, width: int) -> nn.Module:
        cfg = self.cfg
        return QuadraticTower(width, cfg.num_layers, cfg.num_row, cfg.net_dropout, cfg.batch_norm,
                              Activation.identity)


class MeanPoolMLP(QINMLP):
    """Baseline: the mean of the history item vectors in place of ASTA, and an MLP tower (docs/demo_data.md's
    "plain MLP over [target, mean-pooled history]", with the likes/views fields as every model has them)."""

    def build_attention(self, item_dim: int, attention_dim: int) -> HistoryPooling | None:
        return MeanPooling()
