"""Multi-process training with PyTorch DistributedDataParallel, launched by `torchrun`.

`torchrun --nproc_per_node N -m qin train --config ...` starts N processes; each calls
`context()`, which joins the process group (NCCL on CUDA, gloo on CPU) from the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK). A plain `qin train` is a world of one and none of
this code talks to anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn

if TYPE_CHECKING:
    from qin.batch import Batch
    from qin.model import CTRModel


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context() -> Context:
    """The process's place in the job; initialises the process group once when under torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        torch_dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank)


def device_for(ctx: Context) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


class _LossModule(nn.Module):
    """DDP synchronises gradients through a module's forward; ours returns the model's loss."""

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # (loss, logits)
        return self.model.loss(batch)


def wrap(model: CTRModel, ctx: Context, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself, or its DDP wrapper."""
    if ctx.world_size <= 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(_LossModule(model), device_ids=device_ids)


def gather_interleaved(values: np.ndarray, total: int, ctx: Context) -> np.ndarray:
    """Undo `rows[rank::world]` sharding: gather each rank's values back into row order (total,)."""
    pieces: list[np.ndarray | None] = [None] * ctx.world_size
    torch_dist.all_gather_object(pieces, values)
    out = np.empty(total, dtype=values.dtype)
    for rank, piece in enumerate(pieces):
        out[rank::ctx.world_size] = piece
    return out


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        torch_dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.world_size > 1 and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
