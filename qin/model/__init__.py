"""Models: `build_model(cfg, vocab, items)` -> a `CTRModel` (logits out; see layers.CTRModel)."""

from __future__ import annotations

from qin.batch import ItemTables
from qin.config import ModelConfig, ModelName
from qin.model.din import DIN
from qin.model.layers import CTRModel, Vocab
from qin.model.qin import QIN, QINMLP, QINNoASTA, QINNoPReLU, QINSoftmax
from qin.model.qnn_alpha import QNNAlpha

__all__ = ["CTRModel", "DIN", "QIN", "QINMLP", "QINNoASTA", "QINNoPReLU", "QINSoftmax", "QNNAlpha", "Vocab",
           "build_model"]


def build_model(cfg: ModelConfig, vocab: Vocab, items: ItemTables) -> CTRModel:
    """The model named by cfg.name, initialised on CPU (no device move, no optimizer)."""
    match cfg.name:
        case ModelName.qin:
            return QIN(cfg, vocab, items)
        case ModelName.qin_softmax:
            return QINSoftmax(cfg, vocab, items)
        case ModelName.qin_no_asta:
            return QINNoASTA(cfg, vocab, items)
        case ModelName.qin_mlp:
            return QINMLP(cfg, vocab, items)
        case ModelName.qin_no_prelu:
            return QINNoPReLU(cfg, vocab, items)
        case ModelName.qnn_alpha:
            return QNNAlpha(cfg, vocab, items)
        case ModelName.din:
            return DIN(cfg, vocab, items)
        case _:
            choices = ", ".join(name.value for name in ModelName)
            raise ValueError(f"unknown model name {cfg.name!r}; expected one of {choices}")
