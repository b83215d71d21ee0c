"""DIN, the organisers' baseline (FuxiCTR DIN with the challenge's DIN_default config; docs/model.md
section 7).

    embeddings -> item vectors -> DIN attention pooling -> [likes ‖ views ‖ v_t ‖ pooled] -> DNN -> logit

Notation (see qin/model/base.py): B batch, L history slots, U unique items, d_e field width (64 in
DIN_default), M multimodal width (128), d_i = 2 d_e + M item vector width (256: the challenge's dataset
config gives the multimodal feature its own embedding_dim 128, so W_mm is M x M here, not M x d_e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qin.batch import Batch, ItemTables, Vocab
from qin.config import ModelConfig
from qin.model.attention import DINAttention
from qin.model.base import CTRModel, init_weights
from qin.model.embedding import FeatureEmbedding
from qin.model.mlp import MLP, Activation


class DIN(CTRModel):
    """Deep Interest Network: MLP-scored target attention (no softmax), then a DNN.

    `attention_activation`: the challenge's DIN_default uses ReLU in the attention MLP (FuxiCTR's class
    default is Dice; both are available). ModelConfig has no field for it, so it is a constructor argument.
    """

    def __init__(self, cfg: ModelConfig, vocab: Vocab, items: ItemTables,
                 attention_activation: Activation = Activation.relu) -> None:
        super().__init__()
        self.cfg = cfg
        mm_dim = items.mm_emb.shape[1]
        self.embedding = FeatureEmbedding(vocab, items, cfg.embedding_dim, mm_out_dim=mm_dim,
                                          level_zero=cfg.level_zero)
        item_dim = self.embedding.items.output_dim  # d_i = 2 d_e + M
        self.attention = DINAttention(item_dim, cfg.din_attention_hidden, attention_activation,
                                      cfg.din_attention_dropout)
        width = self.embedding.fields_dim + 2 * item_dim  # 128 + 256 + 256 = 640 in DIN_default
        self.dnn = MLP(width, cfg.mlp_hidden, 1, Activation.relu, cfg.net_dropout, cfg.batch_norm)
        init_weights(self)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the DNN input (B, 2 d_e + 2 d_i) and the attention scores (B, L)."""
        mask = batch.history != 0  # (B, L)
        if self.cfg.unique_items:
            # Item vectors once per unique id (0 included, so a padded slot would get exactly the
            # reference's vector, should the attention have to score it).
            items, target_index, history_index = self.embedding.items.encode_unique(
                batch.target_item, batch.history)  # (U, d_i), (B,), (B, L)
            target = F.embedding(target_index, items)  # (B, d_i)
            table, slot_rows = self.history_table(items, history_index, mask)
            if self.attention.real_slots_exact:
                pooled, scores = self.attention.forward_unique(target, table, slot_rows, mask)
            else:  # Dice: its batch statistics cover every slot, so every slot is scored
                pooled, scores = self.attention(target, F.embedding(slot_rows, table), mask)
        else:
            target, history = self.embedding.items.encode_slots(batch.target_item, batch.history)
            history = self.contextualise(history, mask)  # (B, L, d_i)
            pooled, scores = self.attention(target, history, mask)  # (B, d_i), (B, L)
        return torch.cat([self.embedding.fields(batch), target, pooled], dim=-1), scores

    def contextualise(self, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The history vectors the target attention reads, (B, L, d_i) -> (B, L, d_i): DIN reads them as
        they are; DIN-SA (qin/model/din_sa.py) puts them in the context of the row's other items."""
        return history

    def history_table(self, items: torch.Tensor, history_index: torch.Tensor, mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast path's history vectors as a table and each slot's row in it: ((N, d_i), (B, L)).

        DIN's are the unique item vectors (U, d_i) and `history_index`; a model whose history vectors depend
        on the row (DIN-SA) returns one row per slot."""
        return items, history_index

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,), no sigmoid."""
        z, _ = self.encode(batch)  # (B, 2 d_e + 2 d_i)
        return self.dnn(z).squeeze(-1)  # (B,)

    def attention_weights(self, batch: Batch) -> torch.Tensor | None:
        """DIN attention score per history slot (B, L); 0 on padding, not normalised."""
        return self.encode(batch)[1]
