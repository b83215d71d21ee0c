"""The embedding module of the reference: item vectors and the likes/views fields (docs/model.md section 2.1).

Exactly what the embedding L2 regulariser covers. Shapes use the notation of qin/model/base.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import LEVEL_SHIFT, Batch, ItemTables, Vocab
from qin.config import LevelZero
from qin.errors import QinError


class ItemEncoder(nn.Module):
    """Item vector v_j = [E_item[j] ‖ masked mean of E_tag[tags_j] ‖ W_mm m_j]  (d_i = 2 d_e + d_m).

    `tags` (V, T) and `mm_emb` (V, M) are input data: registered as non-persistent buffers, so they follow
    `.to(device)` but are neither parameters nor checkpoint content. They share storage with the given
    ItemTables (no copy) when they already are int64 / float32.
    """

    tags: torch.Tensor  # (V, T) int64 buffer
    mm_emb: torch.Tensor  # (V, M) float32 buffer

    def __init__(self, vocab: Vocab, items: ItemTables, embedding_dim: int, mm_out_dim: int) -> None:
        super().__init__()
        tags, mm_emb = items.tags, items.mm_emb
        if tags.dim() != 2 or mm_emb.dim() != 2:
            raise QinError(f"item tables must be 2-D: tags {tuple(tags.shape)}, mm_emb {tuple(mm_emb.shape)}")
        if tags.shape[0] != vocab.items or mm_emb.shape[0] != vocab.items:
            raise QinError(f"item tables have {tags.shape[0]} tag rows and {mm_emb.shape[0]} multimodal "
                           f"rows; the vocabulary says {vocab.items} items (row 0 = padding)")
        if tags.numel() and (int(tags.min()) < 0 or int(tags.max()) >= vocab.tags):
            raise QinError(f"item tag ids must lie in [0, {vocab.tags}); "
                           f"got [{int(tags.min())}, {int(tags.max())}]")
        self.item_id = nn.Embedding(vocab.items, embedding_dim, padding_idx=0)
        self.item_tags = nn.Embedding(vocab.tags, embedding_dim, padding_idx=0)
        # FuxiCTR adds this bias-free projection to an `embedding`-type feature without a feature_encoder;
        # it lives in the embedding module, so it is xavier-initialised AND L2-regularised like a table.
        self.mm_proj = nn.Linear(mm_emb.shape[1], mm_out_dim, bias=False)
        self.register_buffer("tags", tags.long(), persistent=False)  # (V, T)
        self.register_buffer("mm_emb", mm_emb.float(), persistent=False)  # (V, M)
        self.output_dim = 2 * embedding_dim + mm_out_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors of any id tensor: (*S,) int64 -> (*S, d_i).

        Id 0 gives [0 ‖ 0 ‖ W_mm m_0]: its id and tag rows are padding (zero), but m_0 is whatever row 0 of
        the multimodal table holds, as in the reference. Attention masks make that value irrelevant.
        """
        id_part = self.item_id(ids)  # (*S, d_e)
        tag_vectors = self.item_tags(F.embedding(ids, self.tags))  # (*S, T, d_e)
        # FuxiCTR's MaskedAveragePooling: divide by the number of non-zero tag vectors (+1e-12), so an
        # all-padding tag list gives 0 instead of NaN.
        count = (tag_vectors != 0).any(dim=-1).sum(dim=-1, keepdim=True)  # (*S, 1)
        tag_part = tag_vectors.sum(dim=-2) / (count.to(tag_vectors.dtype) + 1e-12)  # (*S, d_e)
        mm_part = self.mm_proj(F.embedding(ids, self.mm_emb))  # (*S, d_m)
        return torch.cat([id_part, tag_part, mm_part], dim=-1)  # (*S, d_i)

    def encode_slots(self, target: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's way: one item vector per slot, B (L + 1) of them.

        Args: target (B,), history (B, L).
        Returns: v_t (B, d_i), history vectors (B, L, d_i).
        """
        slots = self(torch.cat([history, target.unsqueeze(1)], dim=1))  # (B, L + 1, d_i)
        return slots[:, -1], slots[:, :-1]

    def encode_unique(self, target: torch.Tensor,
                      history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fast path: one item vector per unique id of the batch, plus indices to gather them back.

        Exact, not approximate: an item vector depends only on its id, so computing it once and gathering
        gives the same numbers as computing it per slot. Id 0 stays in the set: its vector is exactly what
        the reference computes for a padded slot, so gathered tensors equal the per-slot ones everywhere,
        even where padded slots are not masked away (DIN's attention MLP sees them).

        Args: target (B,), history (B, L).
        Returns: items (U, d_i), target_index (B,), history_index (B, L); both index rows of `items`.
        """
        batch, slots = history.shape
        ids = torch.cat([history.reshape(-1), target])  # (B L + B,)
        unique_ids, inverse = torch.unique(ids, return_inverse=True)  # (U,), (B L + B,)
        history_index = inverse[: batch * slots].view(batch, slots)  # (B, L)
        return self(unique_ids), inverse[batch * slots:], history_index


class FeatureEmbedding(nn.Module):
    """Every embedding of a model: likes, views and the item encoder (docs/model.md section 2.1)."""

    def __init__(self, vocab: Vocab, items: ItemTables, embedding_dim: int, mm_out_dim: int,
                 level_zero: LevelZero) -> None:
        super().__init__()
        self.likes = nn.Embedding(vocab.levels, embedding_dim, padding_idx=0)
        self.views = nn.Embedding(vocab.levels, embedding_dim, padding_idx=0)
        self.items = ItemEncoder(vocab, items, embedding_dim, mm_out_dim)
        self.fields_dim = 2 * embedding_dim
        self.level_zero = level_zero

    def fields(self, batch: Batch) -> torch.Tensor:
        """x_other = [E_like[likes] ‖ E_view[views]]: (B,) x 2 -> (B, 2 d_e)."""
        return torch.cat([self.likes(self.level_rows(batch.likes_level)),
                          self.views(self.level_rows(batch.views_level))], dim=-1)

    def level_rows(self, level: torch.Tensor) -> torch.Tensor:
        """Embedding rows of encoded levels (B,) -> (B,).

        The reference's level vocabulary gives raw level 0 index 0, its padding row: a zero vector that
        never trains. `LevelZero.padding` reproduces that (encoded level LEVEL_SHIFT, raw 0, reads row 0);
        `embedded` keeps the shifted encoding, so raw 0 trains a row of its own.
        """
        if self.level_zero is LevelZero.padding:
            return level.masked_fill(level == LEVEL_SHIFT, 0)
        return level

    def regularized_parameters(self) -> list[torch.Tensor]:
        """What the embedding L2 covers: all four tables and W_mm (docs/model.md section 2.5)."""
        return [self.likes.weight, self.views.weight, self.items.item_id.weight,
                self.items.item_tags.weight, self.items.mm_proj.weight]

    def l2(self, batch: Batch | None) -> torch.Tensor:
        """Sum of squared entries (no lambda/2).

        batch=None: the whole tables, the reference. With a batch: only the rows that batch reads (its items,
        their tags, its levels) plus the whole W_mm: cheaper, but NOT the reference math.
        """
        if batch is None:
            return torch.stack([weight.pow(2).sum() for weight in self.regularized_parameters()]).sum()
        item_ids = torch.unique(torch.cat([batch.target_item, batch.history.reshape(-1)]))  # (U,)
        tag_ids = torch.unique(F.embedding(item_ids, self.items.tags))  # (<= U T,)
        used = [
            F.embedding(torch.unique(batch.likes_level), self.likes.weight),
            F.embedding(torch.unique(batch.views_level), self.views.weight),
            F.embedding(item_ids, self.items.item_id.weight),
            F.embedding(tag_ids, self.items.item_tags.weight),
            self.items.mm_proj.weight,
        ]
        return torch.stack([rows.pow(2).sum() for rows in used]).sum()
