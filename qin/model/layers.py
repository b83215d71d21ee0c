"""Building blocks shared by every model: the embedding module, target attentions, towers.

Notation (used in every shape comment of `qin/model/`):
    B    batch rows
    L    history slots (max_len, 64); 0 = padding
    V    item vocabulary (rows of item_info, row 0 = padding item)
    T    tags per item (5)
    M    width of the frozen multimodal vector (128)
    U    unique item ids in a batch (target and history, padding id 0 included)
    d_e  embedding width of every field (`embedding_dim`)
    d_m  width of the projected multimodal part W_mm m (d_e for QIN, M for DIN)
    d_i  item vector width = 2 d_e + d_m (3 d_e = 384 in the QIN reference)
    A    attention width (2 d_i = 768 in the QIN reference)
    D    tower width (1024 in the QIN reference)
    R    rows of the Khatri-Rao product (`num_row`)
    H    QNN-alpha heads; d = D / H is one head's width

Initialisation follows FuxiCTR (docs/model.md section 2.1): embedding tables N(0, 1e-4^2) with a zero padding
row, every nn.Linear xavier_normal_ with zero bias, BatchNorm/PReLU/Dice with their defaults. It is applied
by `init_weights`, which each model calls once at the end of its constructor.
"""

from __future__ import annotations

import abc
import enum
import math
from typing import assert_never

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import LEVEL_SHIFT, Batch, ItemTables, Vocab
from qin.config import BCEForm, LevelZero, ModelConfig
from qin.errors import QinError


class Activation(enum.StrEnum):
    relu = "relu"
    prelu = "prelu"  # nn.PReLU(): one shared slope, initial value 0.25 (QIN's tower)
    dice = "dice"  # DIN's data-adaptive activation (FuxiCTR `Dice`)
    identity = "identity"


def make_activation(kind: Activation, width: int) -> nn.Module:
    """One activation module for inputs of `width` features (only Dice uses the width)."""
    match kind:
        case Activation.relu:
            return nn.ReLU()
        case Activation.prelu:
            return nn.PReLU()
        case Activation.dice:
            return Dice(width)
        case Activation.identity:
            return nn.Identity()
        case _:
            assert_never(kind)


def init_weights(model: nn.Module) -> None:
    """FuxiCTR's initialisation, in place: embeddings N(0, 1e-4^2) (padding row 0), Linear xavier_normal_."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=1e-4)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------
# Embeddings: the "embedding module" of the reference; exactly what the embedding L2 regulariser covers.
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# The model interface every trainer/predictor codes against.
# ----------------------------------------------------------------------------------------------------------


class CTRModel(nn.Module, metaclass=abc.ABCMeta):
    """Base of every model: logits out, loss beside, the embedding module in `self.embedding`."""

    embedding: FeatureEmbedding

    @abc.abstractmethod
    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits (B,), no sigmoid."""

    cfg: ModelConfig

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean BCE against batch.label in the form cfg.bce, logits (B,)). Always computed in float32."""
        logits = self(batch)
        return binary_cross_entropy(logits, batch_labels(batch), self.cfg.bce), logits

    def embedding_parameters(self) -> list[torch.Tensor]:
        return self.embedding.regularized_parameters()

    def embedding_l2(self, batch: Batch | None) -> torch.Tensor:
        """sum ||W||^2 over `embedding_parameters()` (trainer: times lambda/2). See FeatureEmbedding.l2."""
        return self.embedding.l2(batch)

    def attention_weights(self, batch: Batch) -> torch.Tensor | None:
        """Attention weight per history slot (B, L), or None for a model without attention."""
        return None


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, form: BCEForm) -> torch.Tensor:
    """Mean BCE of logits (B,) against targets (B,) in [0, 1], in float32.

    `probabilities` is the reference's: BCE of the float32 sigmoid, whose logs torch clamps at -100, so a
    row whose sigmoid rounds to exactly 1 (logit above about 17) or 0 (below about -88) adds a bounded
    constant and no gradient. `logits` is the log-sum-exp form, exact for every logit.
    """
    logits = logits.float()
    match form:
        case BCEForm.probabilities:
            return F.binary_cross_entropy(torch.sigmoid(logits), targets)
        case BCEForm.logits:
            return F.binary_cross_entropy_with_logits(logits, targets)
        case _:
            assert_never(form)


def batch_labels(batch: Batch) -> torch.Tensor:
    """batch.label as float32 (B,); a clear error for unlabelled (test) batches."""
    if batch.label is None:
        raise ValueError("loss() needs a batch with labels (batch.label is None)")
    return batch.label.float()


# ----------------------------------------------------------------------------------------------------------
# Target attention over the history.
# ----------------------------------------------------------------------------------------------------------


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


class Dice(nn.Module):
    """FuxiCTR's Dice: p = sigmoid(BN(x)), out = p x + (1 - p) alpha x. (N, width) -> (N, width)."""

    def __init__(self, width: int, eps: float = 1e-9) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(width, affine=False, eps=eps, momentum=0.01)
        self.alpha = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.bn(x))
        return gate * x + (1 - gate) * self.alpha * x


class MLP(nn.Module):
    """FuxiCTR's MLP_Block: per hidden width Linear -> [BN] -> activation -> [Dropout]; then Linear -> out.

    (N, input_dim) -> (N, output_dim).
    """

    def __init__(self, input_dim: int, hidden: list[int], output_dim: int, activation: Activation,
                 dropout: float, batch_norm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for width_in, width_out in zip([input_dim, *hidden[:-1]], hidden, strict=True):
            layers.append(nn.Linear(width_in, width_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width_out))
            layers.append(make_activation(activation, width_out))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden[-1] if hidden else input_dim, output_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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


# ----------------------------------------------------------------------------------------------------------
# Towers: (B, D) -> (B, 1) logit.
# ----------------------------------------------------------------------------------------------------------


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
        self.branch_dropout = nn.Dropout(dropout)
        self.norm = nn.BatchNorm1d(width) if batch_norm else nn.Identity()
        self.activation = make_activation(activation, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch, width = z.shape
        h = self.branch_dropout(self.linear(z))  # (B, R D)
        h = h.view(batch, self.num_row, width).sum(dim=1)  # (B, D): chunk r = outputs [r D, (r+1) D)
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
        self.branch_dropout = nn.Dropout(dropout)
        # Identity when off: the published layer, with the same parameters and state_dict keys.
        self.product_norm = nn.BatchNorm1d(width) if product_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

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
