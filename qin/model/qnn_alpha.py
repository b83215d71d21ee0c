"""QNN-alpha on QIN's inputs, trained with the Self-Ensemble loss (docs/model.md section 3).

    embeddings -> item vectors -> ASTA -> z0 = [likes ‖ views ‖ v_t ‖ p] -> QNN-alpha tower -> logit

Notation (see qin/model/base.py): B batch, d_e field width, D = F d_e tower width with F = 8 fields of
width d_e (likes, views, the 3 parts of v_t, the 3 parts of p), H heads, R rows.

Everything before the tower is QIN's (this class inherits it); only the tower and the loss differ.
"""

from __future__ import annotations

import math
from typing import assert_never

import torch
import torch.nn.functional as F
from torch import nn

from qin.batch import Batch
from qin.config import BCEForm
from qin.model.base import batch_labels, binary_cross_entropy
from qin.model.qin import QIN
from qin.model.towers import QNNAlphaTower


class QNNAlpha(QIN):
    """ASTA + QNN-alpha tower (mid-activation ReLU on the branch, H heads); SE loss in training."""

    def build_tower(self, width: int) -> nn.Module:
        cfg = self.cfg
        # qnn_alpha_bounded: z0 here is not small field embeddings but raw multimodal projections and
        # ASTA's unnormalised p; see QNNAlphaTower for why the published tower diverges on them.
        return QNNAlphaTower(width, cfg.embedding_dim, cfg.num_layers, cfg.num_row, cfg.num_heads,
                             cfg.net_dropout, cfg.batch_norm, bounded=cfg.qnn_alpha_bounded)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-Ensemble loss in train mode; plain BCE (single pass) in eval mode.

        Train mode: the embedding/attention part runs ONCE, the tower TWICE (different dropout masks):
            p1, p2 = sigmoid(logit1), sigmoid(logit2);  pbar = (p1 + p2) / 2
            loss = BCE(pbar, y) + BCE(p1, sg(pbar)) + BCE(p2, sg(pbar))      (sg = stop-gradient)
        With cfg.bce = probabilities this is the reference's code: BCE on float32 probabilities, logs
        clamped at -100. With `logits` the same value is computed in log space, without the clamp.

        Returns: (loss scalar, logits (B,)); in train mode the logits are logit(pbar), the ensemble's.
        """
        labels = batch_labels(batch)  # (B,)
        z, _ = self.encode(batch)  # (B, D)
        if not self.training:
            logits = self.tower(z).squeeze(-1)  # (B,)
            return binary_cross_entropy(logits, labels, self.cfg.bce), logits
        logit1 = self.tower(z).squeeze(-1).float()  # (B,)
        logit2 = self.tower(z).squeeze(-1).float()  # (B,)
        # log pbar = log((sigmoid(l1) + sigmoid(l2)) / 2), and log(1 - pbar) likewise with -l.
        log_pbar = torch.logaddexp(F.logsigmoid(logit1), F.logsigmoid(logit2)) - math.log(2.0)  # (B,)
        log_1m_pbar = torch.logaddexp(F.logsigmoid(-logit1), F.logsigmoid(-logit2)) - math.log(2.0)  # (B,)
        ensemble_logits = log_pbar - log_1m_pbar  # logit(pbar) (B,)
        match self.cfg.bce:
            case BCEForm.probabilities:
                p1, p2 = torch.sigmoid(logit1), torch.sigmoid(logit2)  # (B,) each
                p_bar = (p1 + p2) / 2  # (B,)
                soft_target = p_bar.detach()
                loss = (F.binary_cross_entropy(p_bar, labels) + F.binary_cross_entropy(p1, soft_target)
                        + F.binary_cross_entropy(p2, soft_target))
            case BCEForm.logits:
                ensemble = -(labels * log_pbar + (1 - labels) * log_1m_pbar).mean()
                soft_target = log_pbar.exp().detach()  # sg(pbar) (B,)
                loss = (ensemble + F.binary_cross_entropy_with_logits(logit1, soft_target)
                        + F.binary_cross_entropy_with_logits(logit2, soft_target))
            case _:
                assert_never(self.cfg.bce)
        return loss, ensemble_logits
