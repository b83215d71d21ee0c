"""DIN-SA: DIN with a self-attention (Transformer encoder) layer over the history before its target attention.

    embeddings -> item vectors -> Transformer encoder over the history -> DIN attention pooling
               -> [likes ‖ views ‖ v_t ‖ pooled] -> DNN -> logit

Notation (see qin/model/base.py): B batch, L history slots, U unique items, d_e field width, M multimodal
width, d_i = 2 d_e + M the DIN item vector width (256 in configs/din_sa.yaml).

Everything is DIN (qin/model/din.py) except that each history item vector h_i is replaced by
o_i = h_i + g T(h)_i, T being `num_layers` post-norm Transformer encoder layers (`num_heads` heads, FFN
2 d_i, dropout net_dropout, no positional encoding) with padding masked as keys (the `correct` mask of
transformer_dcn) and padded outputs zeroed, and g one scalar gate that starts at 0 (`contextualise` says
why). The target attention then scores the o_i against v_t.
Encoder parameters per layer: 4 d_i^2 + 4 d_i (attention) + 2 (2 d_i^2) + 3 d_i (FFN) + 4 d_i (LayerNorms);
plus 1 for the gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import ItemTables, Vocab
from qin.config import ModelConfig, TransformerMask
from qin.model.base import init_weights
from qin.model.din import DIN
from qin.model.mlp import Activation
from qin.model.transformer_dcn import HistoryTransformer


class DINSA(DIN):
    """DIN whose target attention reads self-attended history vectors."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, items: ItemTables,
                 attention_activation: Activation = Activation.relu, num_layers: int = 1,
                 num_heads: int = 2) -> None:
        super().__init__(cfg, vocab, items, attention_activation)
        item_dim = self.embedding.items.output_dim  # d_i
        self.self_attention = HistoryTransformer(item_dim, num_layers, num_heads, 2 * item_dim,
                                                 cfg.net_dropout, TransformerMask.correct)
        init_weights(self)  # again, now that the encoder exists (same scheme for every module)
        # ReZero gate (Bachlechner et al. 2020), 0 at the start: see `contextualise`.
        self.context_gate = nn.Parameter(torch.zeros(()))

    def contextualise(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """o_i = h_i + g T(h)_i, (B, L, d_i) -> (B, L, d_i); zero at padded slots.

        T's post-norm outputs have unit-scale entries whatever the scale of the item vectors (~1e-4 at
        init); DIN's unnormalised attention then sums O(1) vectors with weights that grow in training,
        and on log-like data the pooled input reached |z| ~ 1e3 in 40 steps and the model never beat
        chance (benchmarks/results/suite/logs_small.json). With the gate g starting at 0 the model starts
        as DIN, on the target's scale, and learns how much context to add."""
        encoded, _ = self.self_attention(history, mask)  # (B, L, d_i), zero at padded slots
        return history * mask.unsqueeze(-1).to(history.dtype) + self.context_gate * encoded

    def history_table(self, items: torch.Tensor, history_index: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each slot's contextualised vector is a row of its own: ((B L, d_i), (B, L))."""
        context = self.contextualise(F.embedding(history_index, items), mask)  # (B, L, d_i)
        batch_size, slots, width = context.shape
        slot_rows = torch.arange(batch_size * slots, device=mask.device).view(batch_size, slots)  # (B, L)
        return context.reshape(batch_size * slots, width), slot_rows
