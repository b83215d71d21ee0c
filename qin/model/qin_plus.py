"""QIN+ : QIN made robust to data it was not tuned on. Read top to bottom; the data flow is

    embeddings -> item vectors (multimodal part from UNIT-norm frozen vectors)
        -> softmax ASTA over the history, and the plain mean of the history
        -> similarity block: parameter-free matches of the target with its history (frozen vectors, tags, ids)
        -> z0 = [likes ‖ views ‖ v_t ‖ p ‖ mean ‖ BN(similarities)]
        -> QIN's quadratic tower + an MLP, side by side, their logits summed

Why each change (measured in the README's quality suite; the published QIN stays `model.name: qin`):
- Frozen multimodal vectors are unit-normalised inside the model, so the tower never sees raw PCA outputs
  whose scale depends on the data (a quadratic tower multiplies its inputs).
- Softmax ASTA, with the history mean beside it: the mean is the signal the plainest baseline lives on; the
  attention adds the target-specific match on top instead of having to relearn the mean.
- The similarity block hands the tower, as numbers, what a 2-feature logistic regression already exploits
  (how close the target's content is to the history's) and what attention over few rows learns slowly:
  cosine max / mean / top-3 / last / to-the-mean, tag coverage, a repeat flag and the history length.
  Everything is computed inside the network from the given features; nothing is fitted outside it.
- Two towers: the quadratic one for explicit crosses, the MLP for the rest (the MLP tower was ahead of
  the quadratic one on most data sets; their sum keeps both).

Notation (see qin/model/base.py): B batch, L history slots, U unique items, T tags per item, M width of
the frozen multimodal vector, d_i = 3 d_e item vector width, S = SIMILARITIES scalar features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch, ItemTables, Vocab
from qin.config import ModelConfig
from qin.model.attention import MeanPooling, SoftmaxTargetAttention
from qin.model.base import CTRModel, init_weights
from qin.model.embedding import FeatureEmbedding
from qin.model.mlp import MLP, Activation
from qin.model.towers import QuadraticTower

SIMILARITIES = 9  # S: the columns of HistorySimilarity's output
TOP_K = 3


class HistorySimilarity(nn.Module):
    """Parameter-free target-vs-history matches: (B,) target, (B, L) history -> (B, S).

    Columns: cosine of the target's unit multimodal vector with its history's, as max, mean, mean of the
    top 3 and of the most recent item; cosine with the mean of the history's unit vectors; the share of the
    target's tags found among the history's tags; the share of history items sharing a tag with the target;
    1 if the target is in the history; log(1 + history length). A row with an empty history gets zeros.
    """

    unit_mm: torch.Tensor  # (V, M) buffer
    tags: torch.Tensor  # (V, T) buffer

    def __init__(self, unit_items: ItemTables) -> None:
        """`unit_items.mm_emb` must already have unit-norm rows (see `unit_norm_items`); it is shared, not
        copied, with the item encoder's buffer."""
        super().__init__()
        self.register_buffer("unit_mm", unit_items.mm_emb.float(), persistent=False)
        self.register_buffer("tags", unit_items.tags.long(), persistent=False)

    def forward(self, target: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        mask = history != 0  # (B, L)
        real = mask.to(self.unit_mm.dtype)  # (B, L)
        length = real.sum(dim=1)  # (B,)
        has_history = length > 0  # (B,)
        t = F.embedding(target, self.unit_mm)  # (B, M)
        h = F.embedding(history, self.unit_mm)  # (B, L, M); padding rows are whatever row 0 holds
        cos = torch.bmm(h, t.unsqueeze(-1)).squeeze(-1) * real  # (B, L), 0 on padding
        lowest = torch.finfo(cos.dtype).min
        cos_max = cos.masked_fill(~mask, lowest).max(dim=1).values  # (B,)
        cos_mean = cos.sum(dim=1) / length.clamp_min(1.0)  # (B,)
        k = min(TOP_K, history.shape[1])
        top = cos.masked_fill(~mask, lowest).topk(k, dim=1).values  # (B, k)
        top_real = torch.arange(k, device=history.device) < length.unsqueeze(1)  # (B, k)
        cos_top = (top * top_real).sum(dim=1) / top_real.sum(dim=1).clamp_min(1)  # (B,)
        cos_last = cos[:, -1]  # (B,): histories are left-padded, so the last slot is the most recent item
        pooled = (h * real.unsqueeze(-1)).sum(dim=1)  # (B, M)
        cos_pooled = (pooled * t).sum(dim=1) / pooled.norm(dim=1).clamp_min(1e-12)  # (B,)

        target_tags = F.embedding(target, self.tags)  # (B, T)
        history_tags = F.embedding(history, self.tags)  # (B, L, T); padding item has no tags
        # same (B, T, L, T): target tag a (a real one) equals tag c of history item j
        same = ((target_tags[:, :, None, None] == history_tags[:, None, :, :])
                & (target_tags != 0)[:, :, None, None])
        target_tag_count = (target_tags != 0).sum(dim=1).clamp_min(1)  # (B,)
        tag_coverage = same.flatten(2).any(dim=2).sum(dim=1) / target_tag_count  # (B,)
        sharing = same.any(dim=3).any(dim=1).to(real.dtype) * real  # (B, L)
        tag_share = sharing.sum(dim=1) / length.clamp_min(1.0)  # (B,)
        repeat = ((history == target.unsqueeze(1)) & mask).any(dim=1)  # (B,)

        columns = [cos_max, cos_mean, cos_top, cos_last, cos_pooled, tag_coverage.to(real.dtype), tag_share,
                   repeat.to(real.dtype), torch.log1p(length)]
        stacked = torch.stack(columns, dim=1)  # (B, S)
        return stacked * has_history.unsqueeze(1).to(stacked.dtype)  # (B, S): zeros for an empty history


def unit_norm_items(items: ItemTables) -> ItemTables:
    """The same tables with every multimodal row scaled to unit L2 norm (the zero padding row stays zero)."""
    mm = items.mm_emb.float()  # (V, M)
    return ItemTables(tags=items.tags, mm_emb=mm / mm.norm(dim=1, keepdim=True).clamp_min(1e-12))


class ParallelTower(nn.Module):
    """QIN's quadratic tower and an MLP on the same input, logits summed. (B, D) -> (B, 1)."""

    def __init__(self, quadratic: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.quadratic = quadratic
        self.mlp = mlp

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.quadratic(z) + self.mlp(z)


class QINPlus(CTRModel):
    """Softmax ASTA + history mean + similarity block, into a quadratic tower and an MLP side by side."""

    def __init__(self, cfg: ModelConfig, vocab: Vocab, items: ItemTables) -> None:
        super().__init__()
        self.cfg = cfg
        d_e = cfg.embedding_dim
        unit_items = unit_norm_items(items)  # one (V, M) table, read by the encoder and the similarity block
        self.embedding = FeatureEmbedding(vocab, unit_items, d_e, mm_out_dim=d_e, level_zero=cfg.level_zero)
        item_dim = self.embedding.items.output_dim  # d_i = 3 d_e
        self.attention = SoftmaxTargetAttention(item_dim, cfg.attention_dim or 2 * item_dim)
        self.mean = MeanPooling()
        self.similarity = HistorySimilarity(unit_items)
        self.similarity_norm = nn.BatchNorm1d(SIMILARITIES)  # the columns have very different scales
        width = self.embedding.fields_dim + 3 * item_dim + SIMILARITIES  # D
        quadratic = QuadraticTower(width, cfg.num_layers, cfg.num_row, cfg.net_dropout, cfg.batch_norm,
                                   Activation.prelu)
        mlp = MLP(width, cfg.mlp_hidden, 1, Activation.relu, cfg.net_dropout, cfg.batch_norm)
        self.tower = ParallelTower(quadratic, mlp)
        init_weights(self)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the towers: z0 (B, D) and the attention weights (B, L)."""
        fields = self.embedding.fields(batch)  # (B, 2 d_e)
        mask = batch.history != 0  # (B, L)
        if self.cfg.unique_items:
            items, target_index, history_index = self.embedding.items.encode_unique(
                batch.target_item, batch.history)  # (U, d_i), (B,), (B, L)
            target = F.embedding(target_index, items)  # (B, d_i)
            interest, alpha = self.attention.forward_unique(target, items, history_index, mask)  # (B, d_i)
            mean, _ = self.mean.forward_unique(target, items, history_index, mask)  # (B, d_i)
        else:  # one item vector per slot, as the reference computes them; same numbers
            target, history = self.embedding.items.encode_slots(batch.target_item, batch.history)
            interest, alpha = self.attention(target, history, mask)  # (B, d_i), (B, L)
            mean, _ = self.mean(target, history, mask)  # (B, d_i)
        similarities = self.similarity_norm(self.similarity(batch.target_item, batch.history))  # (B, S)
        return torch.cat([fields, target, interest, mean, similarities], dim=-1), alpha  # (B, D)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,), no sigmoid."""
        z, _ = self.encode(batch)  # (B, D)
        return self.tower(z).squeeze(-1)  # (B,)

    def attention_weights(self, batch: Batch) -> torch.Tensor | None:
        return self.encode(batch)[1]
