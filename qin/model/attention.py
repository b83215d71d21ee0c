"""Target attention over the history: QIN's ASTA (and its softmax ablation), mean pooling, DIN's attention.

Each takes the target item vector, the history and its mask, and returns (pooled (B, d_i), weights (B, L)),
by a per-slot path (the reference's) and an exact fast path over the batch's unique items (`forward_unique`).
Shapes use the notation of qin/model/base.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qin.model.mlp import MLP, Activation


class TargetAttention(nn.Module):
    """QIN's Adaptive Sparse Target Attention (ASTA, docs/model.md section 2.2): one head, no dropout.

    alpha_i = ReLU(mask_i * (q . k_i) / sqrt(A)), p = W_o (sum_i alpha_i u_i) + v_t.
    The score is MULTIPLIED by the 0/1 mask (not -inf filled), as in the reference: a padded slot scores 0,
    ReLU(0) = 0, so it adds nothing and no gradient reaches its key or value.
    """

    def __init__(self, item_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.w_q = nn.Linear(item_dim, attention_dim, bias=False)
        self.w_k = nn.Linear(item_dim, attention_dim, bias=False)
        self.w_v = nn.Linear(item_dim, attention_dim, bias=False)
        self.w_o = nn.Linear(attention_dim, item_dim, bias=False)
        self.scale = math.sqrt(attention_dim)  # sqrt(A) = 27.71 in the reference, not sqrt(d_i)

    def forward(self, target: torch.Tensor, history: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-slot path (the reference): project every history slot.

        Args: target v_t (B, d_i), history (B, L, d_i), mask (B, L) bool, True = real item.
        Returns: p (B, d_i), weights alpha (B, L).
        """
        return self._attend(target, self.w_k(history), self.w_v(history), mask)

    def forward_unique(self, target: torch.Tensor, items: torch.Tensor, history_index: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path: project keys/values once per unique item and touch only the REAL history slots.

        Exact: a key/value depends only on its item vector, so projecting U rows and gathering equals
        projecting B L rows; and a padded slot's masked score is 0, which both weightings (ReLU, and the
        softmax ablation) turn into weight 0, so it adds nothing to the pooled value. Scores are therefore
        computed for the N real (row, slot) pairs only (~9 of 64 slots on MicroLens) and the weighted values
        are summed per row with index_add: no (B, L, A) tensor is ever built, which is most of the memory at
        large scoring batches.

        Args: target (B, d_i), items (U, d_i), history_index (B, L) rows of `items`, mask (B, L).
        Returns: p (B, d_i), alpha (B, L).
        """
        rows, slots = mask.nonzero(as_tuple=True)  # (N,), (N,): the real history items
        item_rows = history_index[rows, slots]  # (N,)
        query = self.w_q(target)  # (B, A)
        keys = F.embedding(item_rows, self.w_k(items))  # (N, A)
        values = F.embedding(item_rows, self.w_v(items))  # (N, A)
        real_scores = (keys * query[rows]).sum(dim=-1) / self.scale  # (N,)
        # Padded slots keep score 0: exactly the reference's score * mask.
        scores = torch.zeros(mask.shape, dtype=real_scores.dtype, device=mask.device)  # (B, L)
        scores = scores.index_put((rows, slots), real_scores)  # (B, L)
        alpha = self.weights(scores, mask)  # (B, L)
        weighted = alpha[rows, slots].unsqueeze(-1).to(values.dtype) * values  # (N, A)
        pooled = torch.zeros(query.shape, dtype=weighted.dtype, device=weighted.device)  # (B, A)
        pooled = pooled.index_add(0, rows, weighted)  # (B, A)
        return self.w_o(pooled.to(target.dtype)) + target, alpha  # (B, d_i): residual to the target

    def _attend(self, target: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.w_q(target)  # (B, A)
        scores = torch.bmm(keys, query.unsqueeze(-1)).squeeze(-1) / self.scale  # (B, L)
        alpha = self.weights(scores, mask)  # (B, L)
        pooled = torch.bmm(alpha.unsqueeze(1).to(values.dtype), values).squeeze(1)  # (B, A)
        return self.w_o(pooled) + target, alpha  # (B, d_i): residual to the TARGET item vector

    def weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ReLU of the masked scores: sparse, unnormalised, unbounded. (B, L) -> (B, L)."""
        return torch.relu(scores * mask.to(scores.dtype))


class SoftmaxTargetAttention(TargetAttention):
    """Ablation: ASTA with a softmax over the non-padding slots in place of the ReLU."""

    def weights(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax over real slots; a row whose history is all padding gets all-zero weights, not NaN."""
        has_items = mask.any(dim=-1, keepdim=True)  # (B, 1)
        # -inf removes padded slots; an all-padding row would be softmax(-inf, ..., -inf) = NaN (also in the
        # backward pass), so its scores are set to 0 instead and its weights zeroed by the mask below.
        scores = scores.masked_fill(~mask, float("-inf")).masked_fill(~has_items, 0.0)  # (B, L)
        return torch.softmax(scores, dim=-1) * mask.to(scores.dtype)  # (B, L)


class MeanPooling(nn.Module):
    """Baseline pooling: the plain mean of the real history item vectors, the same for every target.

    No parameters and no target in the weights: this is the "mean-pooled MLP" of docs/demo_data.md, the model
    target attention is meant to beat, because averaging washes out a sharp match with one past interest.
    Same interface as TargetAttention, so QIN's encoder runs it unchanged; no residual to the target, which
    is in z0 already.
    """

    def forward(self, target: torch.Tensor, history: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: target (B, d_i) (unused), history (B, L, d_i), mask (B, L).
        Returns: mean (B, d_i), weights (B, L)."""
        weights = self.weights(mask, history.dtype)  # (B, L)
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1), weights  # (B, d_i)

    def forward_unique(self, target: torch.Tensor, items: torch.Tensor, history_index: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: target (B, d_i), items (U, d_i), history_index (B, L) rows of `items`, mask (B, L)."""
        return self.forward(target, F.embedding(history_index, items), mask)  # history (B, L, d_i)

    @staticmethod
    def weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """1/n on each of a row's n real slots, 0 on padding; an all-padding row gets all zeros. (B, L)."""
        real = mask.to(dtype)  # (B, L)
        return real / real.sum(dim=-1, keepdim=True).clamp(min=1.0)


# What QIN's encoder pools the history with: the same forward / forward_unique interface.
HistoryPooling = TargetAttention | MeanPooling


class DINAttention(nn.Module):
    """FuxiCTR's DIN_Attention (use_softmax=False): an MLP scores each (target, history item) pair.

    score_i = MLP([t ‖ h_i ‖ t - h_i ‖ t ⊙ h_i]) * mask_i; output = sum_i score_i h_i (no value projection).
    """

    def __init__(self, item_dim: int, hidden: list[int], activation: Activation, dropout: float) -> None:
        super().__init__()
        self.mlp = MLP(4 * item_dim, hidden, 1, activation, dropout, batch_norm=False)
        # Dice normalises with batch statistics over every scored pair, padded slots included, so only
        # without Dice does scoring the real slots alone give the reference's numbers.
        self.real_slots_exact = activation != Activation.dice

    def forward(self, target: torch.Tensor, history: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's way: every slot, padding included, goes through the MLP; the mask then zeroes
        the padded scores.

        Args: target (B, d_i), history (B, L, d_i), mask (B, L) bool.
        Returns: pooled (B, d_i), scores (B, L).
        """
        batch, slots, width = history.shape
        target = target.unsqueeze(1).expand(-1, slots, -1)  # (B, L, d_i)
        pairs = torch.cat([target, history, target - history, target * history], dim=-1)  # (B, L, 4 d_i)
        scores = self.mlp(pairs.view(batch * slots, 4 * width)).view(batch, slots)  # (B, L)
        scores = scores * mask.to(scores.dtype)  # (B, L)
        pooled = torch.bmm(scores.unsqueeze(1).to(history.dtype), history).squeeze(1)  # (B, d_i)
        return pooled, scores

    def forward_unique(self, target: torch.Tensor, items: torch.Tensor, history_index: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path: score only the N REAL (row, slot) pairs (~9 of 64 slots on MicroLens).

        Exact when `real_slots_exact` (no Dice): each pair's score depends on that pair alone, and a padded
        slot's score is multiplied by 0 anyway. In training, dropout draws its masks for the N real pairs
        instead of all B L slots: the same distribution, a different random stream.

        Args: target (B, d_i), items (U, d_i), history_index (B, L) rows of `items`, mask (B, L).
        Returns: pooled (B, d_i), scores (B, L).
        """
        rows, slots = mask.nonzero(as_tuple=True)  # (N,), (N,)
        history = F.embedding(history_index[rows, slots], items)  # (N, d_i)
        paired = target[rows]  # (N, d_i)
        pairs = torch.cat([paired, history, paired - history, paired * history], dim=-1)  # (N, 4 d_i)
        real_scores = self.mlp(pairs).squeeze(-1)  # (N,)
        scores = torch.zeros(mask.shape, dtype=real_scores.dtype, device=mask.device)  # (B, L)
        scores = scores.index_put((rows, slots), real_scores)  # (B, L): padded slots stay 0
        weighted = real_scores.unsqueeze(-1).to(history.dtype) * history  # (N, d_i)
        pooled = torch.zeros(target.shape, dtype=weighted.dtype, device=weighted.device)  # (B, d_i)
        return pooled.index_add(0, rows, weighted).to(target.dtype), scores
