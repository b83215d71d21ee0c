"""Models: `build_model(cfg, vocab, items)` -> a `CTRModel` (logits out; see base.CTRModel)."""

from __future__ import annotations

from qin.batch import ItemTables, Vocab
from qin.config import ModelConfig, ModelName
from qin.model.base import CTRModel
from qin.model.dcnv2 import DCNv2
from qin.model.din import DIN
from qin.model.din_sa import DINSA
from qin.model.dlf import DLF
from qin.model.qin import QIN, QINMLP, MeanPoolMLP, QINNoASTA, QINNoPReLU, QINSoftmax
from qin.model.qin_plus import QINPlus
from qin.model.qnn_alpha import QNNAlpha
from qin.model.transformer_dcn import TransformerDCN

__all__ = ["MODELS", "CTRModel", "DCNv2", "DIN", "DINSA", "DLF", "MeanPoolMLP", "QIN", "QINMLP", "QINNoASTA",
           "QINNoPReLU", "QINPlus", "QINSoftmax", "QNNAlpha", "TransformerDCN", "Vocab", "build_model"]


MODELS: dict[ModelName, type[CTRModel]] = {
    ModelName.qin: QIN,
    ModelName.qin_softmax: QINSoftmax,
    ModelName.qin_no_asta: QINNoASTA,
    ModelName.qin_mlp: QINMLP,
    ModelName.qin_no_prelu: QINNoPReLU,
    ModelName.qnn_alpha: QNNAlpha,
    ModelName.din: DIN,
    ModelName.mean_pool_mlp: MeanPoolMLP,
    ModelName.qin_plus: QINPlus,
    ModelName.dcnv2: DCNv2,
    ModelName.transformer_dcn: TransformerDCN,
    ModelName.din_sa: DINSA,
    ModelName.dlf: DLF,
}


def build_model(cfg: ModelConfig, vocab: Vocab, items: ItemTables) -> CTRModel:
    """The model named by cfg.name, initialised on CPU (no device move, no optimizer)."""
    if cfg.name not in MODELS:
        choices = ", ".join(name.value for name in ModelName)
        raise ValueError(f"unknown model name {cfg.name!r}; expected one of {choices}")
    return MODELS[cfg.name](cfg, vocab, items)
