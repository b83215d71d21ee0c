"""Online scoring of one request: one user's history x C candidate items, by a frozen (eval-mode) model.

The plain path (`plain_request`) repeats the history C times into a (C, L) batch and runs the whole model:
every candidate recomputes the same history keys and values, and QIN's tower runs its R-row linears.

The fast path (`ModelServer`) does the same math in another order, for the models that keep QIN's data flow
(`unsupported_reason` is the rule). At eval time an item vector, its ASTA key and its ASTA value depend on
the item id alone, so they are computed once per model for the whole vocabulary; a request then
    gathers the n REAL history items' keys and values (padding scores 0 in the reference, so it weighs 0),
    scores the C targets against that one shared history: (C, d_i) x (d_i, n), no (C, L, A) tensor,
    pools with the model's own weighting (ReLU or softmax) and adds the residual target vector,
    runs the tower on C rows; QIN's quadratic tower folded (`FoldedQuadraticTower`): each layer's R chunks
    summed into one D x D linear with BatchNorm's scale in it, the first linear read from per-item tables.
Every step is an exact algebraic identity of the plain path; only the float summation order differs, so the
probabilities agree to float tolerance (tests/test_serve.py holds both paths to rtol 1e-5, atol 1e-6). A
model with huge activations amplifies float32 rounding in both paths alike: freshly initialised, the
reference tower reaches ~1e4 and either path then lands up to ~1e-4 from the float64 value (and as far from
the other); `benchmarks/measure.py latency` reports both paths against a float64 copy.

Notation (qin/model/base.py): C candidates, L history slots, n real (non-padding) history items, V item
vocabulary, d_i item vector width, A attention width, D tower width, R rows per quadratic layer.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch
from qin.model import QIN, CTRModel
from qin.model.attention import SoftmaxTargetAttention, TargetAttention
from qin.model.embedding import FeatureEmbedding, ItemEncoder
from qin.model.towers import QuadraticLayer, QuadraticTower

# Attentions whose weights are a function of each row's REAL-slot scores alone (ReLU per slot; softmax over
# the real slots), which is what lets the fast path score only the real history items. Exact types: a
# subclass may change `forward` or `weights` in a way this module does not know about.
SUPPORTED_ATTENTIONS: tuple[type[nn.Module], ...] = (TargetAttention, SoftmaxTargetAttention)

# Items per chunk when the per-item tables are built: bounds the temporaries (chunk x T x d_e tag vectors,
# chunk x A projections) to a few MiB instead of V-sized ones.
TABLE_CHUNK = 4096

# Rows a request usually scores (candidates): oneDNN picks its packed weight layout for this many.
REQUEST_ROWS_HINT = 100

Fingerprint = tuple[tuple[int, int], ...]


def unsupported_reason(model: CTRModel) -> str | None:
    """Why the fast path cannot score this model exactly, or None when it can.

    The rule: a QIN (or a subclass) that keeps QIN's `encode` and `forward`, pools its history with exactly
    TargetAttention or SoftmaxTargetAttention and has QIN's item encoder. The tower may be any: it runs as
    it is on C rows (QIN's own quadratic tower is folded). Today that is qin, qin_softmax, qin_mlp,
    qin_no_prelu, qnn_alpha, dcnv2 and dlf; every other model gets the plain path.
    """
    if not isinstance(model, QIN):
        return f"{type(model).__name__} is not a QIN"
    if type(model).encode is not QIN.encode or type(model).forward is not QIN.forward:
        return f"{type(model).__name__} overrides QIN's encode/forward"
    if type(model.attention) not in SUPPORTED_ATTENTIONS:
        return f"{type(model).__name__} pools its history with {type(model.attention).__name__}"
    if type(model.embedding) is not FeatureEmbedding or type(model.embedding.items) is not ItemEncoder:
        return f"{type(model).__name__} has another item encoder"
    return None


def supports(model: CTRModel) -> bool:
    """True when `unsupported_reason(model)` is None."""
    return unsupported_reason(model) is None


def in_eval_mode(model: nn.Module) -> bool:
    """Every submodule in eval mode (dropout off, BatchNorm on running statistics): what the fast path
    computes."""
    return not any(module.training for module in model.modules())


class PackedLinear:
    """x W^T + b for a frozen (out, in) weight, on a weight packed once into oneDNN's blocked layout.

    A request's tower runs its D x D linears on C ~ 100 rows. For so few rows the plain float32 GEMM
    re-reads W in its row-major layout on every call; oneDNN's pre-packed weight (the layout PyTorch's own
    CPU inference freezing uses) makes the same float32 multiply-adds about 2.7 times faster on this
    machine (1.31 -> 0.49 ms at C = 100, D = 1024). Only the summation order differs: the result agrees
    with `F.linear` to float32 rounding. The plain `F.linear` runs instead where the packed kernel does not
    apply: a weight not on the CPU or not float32, a PyTorch built without oneDNN, and under CPU autocast
    (`train.cpu_bf16`), whose bf16 GEMM is faster still.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias  # (out, in), (out,)
        self.packed: torch.Tensor | None = None
        on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
        if on_cpu and torch.backends.mkldnn.is_available():
            try:
                with torch.inference_mode():
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, REQUEST_ROWS_HINT)
            except (AttributeError, RuntimeError):  # an op this build lacks: F.linear serves
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (C, in) -> (C, out)."""
        if (self.packed is None or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@dataclass(frozen=True)
class FoldedLayer:
    """One QuadraticLayer in eval mode: out = activation(z ⊙ (W z + b) + shift) + z.  (C, D) -> (C, D).

    The layer computes activation(BN(z ⊙ sum_r (W_r z + b_r))) + z, dropout being the identity in eval mode.
    Its R chunks sum into one D x D linear (R times fewer multiply-adds), and BatchNorm on running statistics
    is the affine y s + t, whose per-unit scale s moves into that linear's rows: s ⊙ (z ⊙ h) = z ⊙ (s ⊙ h).
    """

    weight: torch.Tensor  # (D, D) = s ⊙ sum_r W_r (row-wise)
    bias: torch.Tensor  # (D,) = s ⊙ sum_r b_r
    shift: torch.Tensor  # (D,) t = beta - mean s (0 without BatchNorm)
    activation: nn.Module  # the layer's own (PReLU, or the identity in qin_no_prelu)
    linear: PackedLinear  # z -> W z + b, on the packed weight

    def __call__(self, z: torch.Tensor, linear: torch.Tensor | None = None) -> torch.Tensor:
        """z (C, D) -> (C, D); `linear` = W z + b when the caller has it already (the first layer)."""
        h = self.linear(z) if linear is None else linear  # (C, D)
        return self.activation(torch.addcmul(self.shift, z, h)) + z  # (C, D)


def norm_is_affine(norm: nn.Module) -> bool:
    """A QuadraticLayer's norm that is a fixed per-unit affine in eval mode: the identity, or BatchNorm1d on
    running statistics (one built with track_running_stats=False normalises by the batch even in eval)."""
    return type(norm) is nn.Identity or (type(norm) is nn.BatchNorm1d and norm.running_mean is not None)


def fold_layer(layer: QuadraticLayer) -> FoldedLayer:
    """The eval-mode layer as a FoldedLayer. Chunk r is output rows [r D, (r+1) D), as the layer splits it."""
    rows, width = layer.num_row, layer.linear.in_features
    norm = layer.norm
    with torch.no_grad():
        like = layer.linear.weight
        scale = torch.ones(width, dtype=like.dtype, device=like.device)  # (D,): the identity
        shift = torch.zeros(width, dtype=like.dtype, device=like.device)  # (D,)
        if isinstance(norm, nn.BatchNorm1d):
            assert norm.running_mean is not None and norm.running_var is not None  # norm_is_affine()
            scale = torch.rsqrt(norm.running_var + norm.eps)  # (D,)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
        weight = layer.linear.weight.view(rows, width, width).sum(dim=0) * scale.unsqueeze(1)  # (D, D)
        bias = layer.linear.bias.view(rows, width).sum(dim=0) * scale  # (D,)
    return FoldedLayer(weight, bias, shift, layer.activation, PackedLinear(weight, bias))


def _chunked_mm(table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """table (V, k) x weight (k, m) -> (V, m), TABLE_CHUNK rows at a time (same rows, bounded temporaries)."""
    out = torch.empty(table.shape[0], weight.shape[1], dtype=table.dtype, device=table.device)  # (V, m)
    for start in range(0, table.shape[0], TABLE_CHUNK):
        rows = slice(start, start + TABLE_CHUNK)
        torch.mm(table[rows], weight, out=out[rows])
    return out


class FoldedQuadraticTower:
    """QIN's QuadraticTower in eval mode: FoldedLayers, the first one's linear read from tables.

    The tower is most of a request's multiply-adds. Its first linear, of z0 = [likes ‖ views ‖ v_t ‖ p] with
    p = sum_i alpha_i value'_i + v_t, splits by z0's column blocks (W_l, W_v, W_t, W_p) into parts that each
    depend on one id:
        h_1 = W_l E_like[likes] + W_v E_view[views] + (W_t + W_p) v_t + sum_i alpha_i W_p value'_i + b
    so it is three gathers from per-level and per-item tables, and W_p applied to the n real history
    values only (n d_i D multiply-adds instead of C d_i D: n is ~9 on MicroLens, C 100).
    Memory: one (V, D) table, 4 KiB per item at D = 1024 (358 MiB for the challenge's 91,718 items).
    """

    def __init__(self, tower: QuadraticTower, embedding: FeatureEmbedding, vectors: torch.Tensor) -> None:
        layers = []
        for layer in tower.layers:
            assert isinstance(layer, QuadraticLayer)  # is_quadratic_tower()
            layers.append(fold_layer(layer))
        self.first, self.rest, self.output = layers[0], layers[1:], tower.output
        field, item = embedding.likes.embedding_dim, vectors.shape[1]  # d_e, d_i
        w_likes, w_views, w_target, w_interest = self.first.weight.split([field, field, item, item], dim=1)
        self.level_rows = embedding.level_rows
        self.w_interest = w_interest  # (D, d_i): W_p
        with torch.inference_mode():
            # The bias rides on the likes table: every row reads exactly one likes row.
            self.likes = torch.mm(embedding.likes.weight, w_likes.t()) + self.first.bias  # (levels, D)
            self.views = torch.mm(embedding.views.weight, w_views.t())  # (levels, D)
            # v_t enters z0 twice: as itself and as the residual inside p.
            self.target = _chunked_mm(vectors, (w_target + w_interest).t())  # (V, D)

    def first_linear(self, batch: Batch, alpha: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The first layer's folded linear of z0, (C, D), from the tables.

        Args: batch (the request's, levels encoded as the model reads them), ASTA weights alpha (C, n) over
        the real history items, their folded values value' (n, d_i).
        """
        ids = (F.embedding(self.level_rows(batch.likes_level), self.likes)  # (C, D)
               + F.embedding(self.level_rows(batch.views_level), self.views)
               + F.embedding(batch.target_item, self.target))
        return torch.addmm(ids, alpha, F.linear(values, self.w_interest))  # + (C, n) x (n, D)

    def __call__(self, z: torch.Tensor, first_linear: torch.Tensor) -> torch.Tensor:
        """z0 (C, D) and its first linear (C, D) -> logits (C, 1)."""
        z = self.first(z, first_linear)  # (C, D)
        for layer in self.rest:
            z = layer(z)  # (C, D)
        return self.output(z)  # (C, 1)


def is_quadratic_tower(tower: nn.Module) -> TypeGuard[QuadraticTower]:
    """QIN's exact QuadraticTower, of exact QuadraticLayers with an affine norm: the one tower folded."""
    return (type(tower) is QuadraticTower and len(tower.layers) > 0
            and all(type(layer) is QuadraticLayer and norm_is_affine(layer.norm) for layer in tower.layers))


class ModelServer:
    """The fast path for one frozen model: per-item tables, built once, and the per-request computation.

    Holds the model's submodules, tensors and tables, never the model itself, so the weak cache below can
    drop it. Memory: three (V, d_i) tables, 4.5 KiB per item at d_i = 384 (403 MiB for the challenge's
    91,718 items), plus the folded quadratic tower's (see FoldedQuadraticTower).
    """

    def __init__(self, model: QIN) -> None:
        attention = model.attention
        assert isinstance(attention, TargetAttention)  # unsupported_reason() was None
        # Listed once: walking the module tree on every request costs more than the check itself.
        self.submodules = [module for module in model.modules() if module is not model]
        self.tensors = [*model.parameters(), *model.buffers()]
        self.fingerprint = self.weights_fingerprint()
        self.embedding = model.embedding
        self.attention_weights = attention.weights  # the model's own ReLU or softmax, on real slots' scores
        self.scale = attention.scale
        self.vectors, self.keys, self.values = item_tables(model.embedding.items, attention)
        self.tower = model.tower  # any other tower runs as it is, on C rows
        self.folded = (FoldedQuadraticTower(model.tower, model.embedding, self.vectors)
                       if is_quadratic_tower(model.tower) else None)

    def weights_fingerprint(self) -> Fingerprint:
        """(storage address, in-place version) of each of the model's parameters and buffers.

        Changes when weights are loaded in place, trained (optimizer steps are in-place) or moved to another
        device, so the tables are never older than the weights. Not seen: a parameter or module REPLACED by
        a new object (assign weights with load_state_dict, as qin does, or score with a new model).
        """
        return tuple((tensor.data_ptr(), tensor._version) for tensor in self.tensors)

    def is_current(self) -> bool:
        """The tables were built from the weights the model holds now."""
        return self.weights_fingerprint() == self.fingerprint

    def in_eval_mode(self, model: nn.Module) -> bool:
        """`in_eval_mode(model)`, from the listed submodules."""
        return not model.training and not any(module.training for module in self.submodules)

    def score(self, history: np.ndarray, candidates: np.ndarray, likes: np.ndarray,
              views: np.ndarray) -> np.ndarray:
        """(C,) float32 probabilities, as `plain_request` returns them."""
        device = self.vectors.device
        with torch.inference_mode():
            targets = torch.as_tensor(candidates, dtype=torch.long, device=device)  # (C,)
            slots = torch.as_tensor(history, dtype=torch.long, device=device).reshape(-1)  # (L,)
            # Only real items: the reference multiplies a padded slot's score by 0 and both weightings give
            # it weight 0, so dropping it changes nothing (an empty history pools to 0: p = v_t).
            real = slots[slots != 0]  # (n,)
            # The same batch the plain path builds (the history row is a view, not C copies): the likes/views
            # fields come from the model's own code.
            batch = Batch(target_item=targets, history=slots.view(1, -1).expand(targets.shape[0], -1),
                          likes_level=torch.as_tensor(likes, dtype=torch.long, device=device),
                          views_level=torch.as_tensor(views, dtype=torch.long, device=device))
            fields = self.embedding.fields(batch)  # (C, 2 d_e)
            # F.embedding, not indexing: an id out of range raises as in the plain path (no wrap-around).
            target = F.embedding(targets, self.vectors)  # (C, d_i)
            scores = torch.mm(target, F.embedding(real, self.keys).t()) / self.scale  # (C, n)
            alpha = self.attention_weights(scores, torch.ones_like(scores, dtype=torch.bool))  # (C, n)
            values = F.embedding(real, self.values)  # (n, d_i)
            interest = torch.mm(alpha, values) + target  # (C, d_i): p
            z = torch.cat([fields, target, interest], dim=-1)  # (C, D), QIN.encode's z0
            if self.folded is None:
                logits = self.tower(z)  # (C, 1)
            else:
                logits = self.folded(z, self.folded.first_linear(batch, alpha, values))  # (C, 1)
            return torch.sigmoid(logits.squeeze(-1).float()).cpu().numpy()


def item_tables(encoder: ItemEncoder, attention: TargetAttention
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every item's vector, folded key and folded value: three (V, d_i) tables on the model's device.

    Folded so that a request needs no attention projection at all:
        key'_i   = W_q^T W_k v_i   so that v_t . key'_i = (W_q v_t) . (W_k v_i), ASTA's score numerator;
        value'_i = W_o W_v v_i     so that sum_i alpha_i value'_i = W_o (sum_i alpha_i W_v v_i).
    Both are d_i wide, not A (= 2 d_i) wide: half the memory of plain keys and values, and no (C, A) query.
    Row 0 (the padding item) is what the plain path computes for id 0; only a candidate id 0 can read it.
    """
    weight = encoder.item_id.weight
    count = int(encoder.tags.shape[0])  # V
    with torch.inference_mode():
        vectors = torch.empty(count, encoder.output_dim, dtype=weight.dtype, device=weight.device)  # (V, d_i)
        keys, values = torch.empty_like(vectors), torch.empty_like(vectors)  # (V, d_i) each
        for start in range(0, count, TABLE_CHUNK):
            ids = torch.arange(start, min(start + TABLE_CHUNK, count), device=weight.device)  # (chunk,)
            chunk = encoder(ids)  # (chunk, d_i)
            rows = slice(start, start + len(ids))
            vectors[rows] = chunk
            keys[rows] = torch.mm(attention.w_k(chunk), attention.w_q.weight)  # (chunk, A) x (A, d_i)
            values[rows] = attention.w_o(attention.w_v(chunk))  # (chunk, d_i)
    return vectors, keys, values


# One server per model object, dropped with the model (weak keys). The lock makes concurrent first requests
# build it once.
_SERVERS: weakref.WeakKeyDictionary[nn.Module, ModelServer] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def server_for(model: CTRModel) -> ModelServer | None:
    """This model's server, built on first use and rebuilt only if its weights changed; None when the fast
    path does not apply: an unsupported model, or one in training mode (dropout, batch statistics)."""
    server = _SERVERS.get(model)
    if server is not None and server.is_current():  # the common case: a few microseconds of checks
        return server if server.in_eval_mode(model) else None
    if unsupported_reason(model) is not None or not in_eval_mode(model):
        return None
    assert isinstance(model, QIN)
    with _LOCK:
        server = _SERVERS.get(model)
        if server is None or not server.is_current():
            server = ModelServer(model)
            _SERVERS[model] = server
    return server


def plain_request(model: CTRModel, device: torch.device, history: np.ndarray, candidates: np.ndarray,
                  likes: np.ndarray, views: np.ndarray) -> np.ndarray:
    """The reference: a (C, L) batch with the history repeated C times, through the whole model."""
    count = len(candidates)
    batch = Batch(
        target_item=torch.as_tensor(candidates, dtype=torch.long),
        history=torch.as_tensor(history, dtype=torch.long).view(1, -1).expand(count, -1),
        likes_level=torch.as_tensor(likes, dtype=torch.long),
        views_level=torch.as_tensor(views, dtype=torch.long),
    ).to(device)
    with torch.no_grad():
        return torch.sigmoid(model(batch).float()).cpu().numpy()


def score_request(model: CTRModel, device: torch.device, history: np.ndarray, candidates: np.ndarray,
                  likes: np.ndarray, views: np.ndarray) -> np.ndarray:
    """(C,) probabilities of one request: the fast path when `server_for(model)` has one, else the plain."""
    server = server_for(model)
    if server is None:
        return plain_request(model, device, history, candidates, likes, views)
    return server.score(history, candidates, likes, views)
