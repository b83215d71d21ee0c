"""The model interface every trainer and predictor codes against: `CTRModel`, its loss, the initialisation.

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
from typing import assert_never

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch
from qin.config import BCEForm, ModelConfig
from qin.model.embedding import FeatureEmbedding


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
