"""Transformer-DCN, the MicroLens challenge's 1st place (valid AUC 0.9766, test 0.9839), as read.

    embeddings -> item vectors -> s_i = [h_i ‖ v_t] per history slot -> Transformer encoder -> o (B, L, 2 d_i)
    x = [likes ‖ views ‖ v_t ‖ o_{L-k+1} ‖ ... ‖ o_L ‖ maxpool_valid(o)]
    logit = MLP_[64, 32]([CrossNetV2(x) ‖ DNN(x)])

Notation (see qin/model/base.py): B batch, L history slots, d_e field width, d_i = 3 d_e item vector width
(QIN's item encoder: id, tags and the projected frozen multimodal vector), W = 2 d_i the encoder width,
k = 16 the kept last outputs. The head input has width X = 2 d_e + d_i + k W + W.

Encoder: 2 post-norm layers (torch's TransformerEncoderLayer), 1 head, FFN 256, dropout net_dropout, no
positional encoding (the issue names none; histories are left-padded, so the last k slots are the most
recent items). Outputs at padded slots are zeroed, and a history shorter than k is left-padded with zeros,
so the head's width does not depend on max_len.

Key padding mask (`model.transformer_mask`; True = a key attention ignores):
    correct       True on the padding slots.
    as_published  the published bug: the "valid" mask passed straight in, True on the REAL slots, so every
                  real slot attends to padding only. A row whose every key is masked (a full history here;
                  an empty one under `correct`) would give NaN in torch's softmax: its keys are unmasked for
                  the call and its outputs set to zero.
"""

from __future__ import annotations

from typing import assert_never

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch, ItemTables, Vocab
from qin.config import ModelConfig, TransformerMask
from qin.model.base import CTRModel, init_weights
from qin.model.dcnv2 import DCNv2Block
from qin.model.embedding import FeatureEmbedding
from qin.model.mlp import MLP, Activation


class HistoryTransformer(nn.Module):
    """A Transformer encoder over the history slots with a key padding mask. (B, L, W) -> (B, L, W).

    Outputs are zero wherever `keep` is False: the padded slots, and every slot of a row whose keys were
    all masked (see the module docstring). Both of the model's paths call it on the same (B, L, W) tensor.
    """

    def __init__(self, width: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 mask: TransformerMask) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, num_heads, ffn_dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.mask = mask

    def forward(self, sequence: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: sequence (B, L, W), valid (B, L) bool, True = real item.
        Returns: outputs (B, L, W), zero where not kept; keep (B, L) bool."""
        match self.mask:
            case TransformerMask.correct:
                ignore = ~valid  # (B, L)
            case TransformerMask.as_published:
                ignore = valid  # the published bug: the valid mask as the padding mask
            case _:
                assert_never(self.mask)
        all_ignored = ignore.all(dim=-1, keepdim=True)  # (B, 1): softmax over no key would be NaN
        out = self.encoder(sequence, src_key_padding_mask=ignore & ~all_ignored)  # (B, L, W)
        keep = valid & ~all_ignored  # (B, L)
        return out * keep.unsqueeze(-1).to(out.dtype), keep


class TransformerDCN(CTRModel):
    """Transformer over [history item ‖ target] pairs, last-k + max-pool readout, DCNv2 head with an MLP."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, items: ItemTables, last_k: int = 16,
                 num_layers: int = 2, num_heads: int = 1, ffn_dim: int = 256,
                 top_hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.cfg = cfg
        d_e = cfg.embedding_dim
        self.embedding = FeatureEmbedding(vocab, items, d_e, mm_out_dim=d_e, level_zero=cfg.level_zero)
        item_dim = self.embedding.items.output_dim  # d_i = 3 d_e
        width = 2 * item_dim  # W: history item ‖ target
        self.last_k = last_k
        self.transformer = HistoryTransformer(width, num_layers, num_heads, ffn_dim, cfg.net_dropout,
                                              cfg.transformer_mask)
        head_width = self.embedding.fields_dim + item_dim + last_k * width + width  # X
        self.dcn = DCNv2Block(head_width, cfg.cross_layers, cfg.cross_rank, cfg.mlp_hidden, cfg.net_dropout,
                              cfg.batch_norm)
        self.top = MLP(self.dcn.output_dim, list(top_hidden), 1, Activation.relu, cfg.net_dropout,
                       cfg.batch_norm)
        init_weights(self)

    def item_vectors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """v_t (B, d_i) and the history item vectors (B, L, d_i), by either path (equal numbers)."""
        if self.cfg.unique_items:
            items, target_index, history_index = self.embedding.items.encode_unique(
                batch.target_item, batch.history)  # (U, d_i), (B,), (B, L)
            return F.embedding(target_index, items), F.embedding(history_index, items)
        return self.embedding.items.encode_slots(batch.target_item, batch.history)

    def encode(self, batch: Batch) -> torch.Tensor:
        """The head input x (B, X)."""
        target, history = self.item_vectors(batch)  # (B, d_i), (B, L, d_i)
        valid = batch.history != 0  # (B, L)
        pairs = torch.cat([history, target.unsqueeze(1).expand_as(history)], dim=-1)  # (B, L, W)
        out, keep = self.transformer(pairs, valid)  # (B, L, W), (B, L)
        recent = out[:, -self.last_k:]  # (B, min(k, L), W)
        recent = F.pad(recent, (0, 0, self.last_k - recent.shape[1], 0))  # (B, k, W): zeros on the left
        pooled = out.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(dim=1)  # (B, W)
        pooled = torch.where(keep.any(dim=-1, keepdim=True), pooled, torch.zeros_like(pooled))  # empty: 0
        return torch.cat([self.embedding.fields(batch), target, recent.flatten(1), pooled], dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,), no sigmoid."""
        return self.top(self.dcn(self.encode(batch))).squeeze(-1)  # (B,)
