"""What training and inference share: the device, the seeds, bf16 autocast, batched scoring and
loading weights into a model. `train` and `predict` both build on this module, never on each other.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from qin.config import DeviceChoice, TrainConfig
from qin.data import SplitTensors, iterate_batches
from qin.errors import QinError
from qin.model import CTRModel


def resolve_device(choice: DeviceChoice) -> torch.device:
    match choice:
        case DeviceChoice.auto:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        case DeviceChoice.cpu:
            return torch.device("cpu")
        case DeviceChoice.cuda:
            if not torch.cuda.is_available():
                raise QinError("train.device is 'cuda' but no CUDA device is available")
            return torch.device("cuda", torch.cuda.current_device())
    raise ValueError(f"unknown device choice {choice!r}")


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (CPU and CUDA) seeds, cuDNN deterministic, as FuxiCTR does."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def autocast_context(device: torch.device, train_cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA with train.bf16 (no loss scaling needed for bf16), on CPU with train.cpu_bf16;
    otherwise none."""
    if device.type == "cuda" and train_cfg.bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and train_cfg.cpu_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_probabilities(model: CTRModel, split: SplitTensors, batch_size: int, device: torch.device,
                          train_cfg: TrainConfig) -> np.ndarray:
    """Click probabilities for every row of `split`, in row order: (N,) float64."""
    was_training = model.training
    model.eval()
    chunks = []
    for batch in iterate_batches(split, batch_size):
        with autocast_context(device, train_cfg):
            logits = model(batch.to(device, non_blocking=True))
        chunks.append(torch.sigmoid(logits.float()).cpu())
    model.train(was_training)
    return torch.cat(chunks).double().numpy() if chunks else np.zeros(0)


def load_weights(model: CTRModel, state: dict[str, torch.Tensor], source: Path) -> None:
    """`model.load_state_dict`, with a one-line error when the shapes were made for other features."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line
                       or "Missing key" in line or "Unexpected key" in line), str(error).splitlines()[0])
        raise QinError(f"{source}: the checkpoint does not fit these features or this model ({detail}); "
                       "use the feature folder and config it was trained with") from error
