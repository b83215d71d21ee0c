"""Dropout with nn.Dropout's math and a cheaper mask on CPU.

The math is nn.Dropout's: in training each element is kept with probability q = 1 - p, independently, and
kept elements are scaled by 1 / q; in eval it is the identity. On CUDA (and for p = 0 or 1) this module calls
torch's own dropout. On CPU, torch draws the mask with `bernoulli_`, which costs about as much as a matmul
layer of QIN's tower at batch 8192 (benchmarks/reference_speed.py); here the mask comes from the same
generator's raw 64-bit words instead, two 32-bit halves per word, each compared with q scaled to the
half's range. `Tensor.random_()` fills an int64 with uniform integers in [0, 2^63), so the low half is
uniform over all 2^32 int32 values and the high half over [0, 2^31): thresholds of q * 2^32 and q * 2^31
give each element probability q to within 2^-31 (torch's float uniform is exact to 2^-24 only). The mask
is kept as bool (1 byte per element, where nn.Dropout keeps a float mask) and applied with `torch.where`.

Random numbers come from torch's default CPU generator, so a run is deterministic per seed and a resumed run
(which restores the generator) draws the same masks. The stream differs from nn.Dropout's: the same seed
gives other masks than torch's dropout would.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def keep_mask(shape: torch.Size, keep: float) -> torch.Tensor:
    """A bool tensor of `shape`, each element True with probability `keep`, independently (CPU)."""
    count = shape.numel()
    words = torch.empty((count + 1) // 2, dtype=torch.int64).random_()  # uniform in [0, 2^63)
    halves = words.view(torch.int32).view(-1, 2)  # little-endian: (low half, high half) per word
    # low half: uniform over [-2^31, 2^31); high half: uniform over [0, 2^31)
    thresholds = torch.tensor([-(2**31) + round(keep * 2**32), round(keep * 2**31)], dtype=torch.int32)
    return (halves < thresholds).view(-1)[:count].view(shape)


class _KeepAndScale(torch.autograd.Function):
    """y = where(keep, x, 0) / q; its gradient is the same map of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


class _KeepSumScale(torch.autograd.Function):
    """(B, K W) -> (B, W): y = sum_k where(keep, x, 0)[:, k W:(k + 1) W] / q. Scaling after the sum touches a
    K times smaller tensor, forward and backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float, chunks: int) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        kept = torch.where(keep, x, 0)  # (B, K W)
        return kept.view(x.shape[0], chunks, -1).sum(dim=1).mul_(scale)  # (B, W)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (keep,) = ctx.saved_tensors
        chunks = keep.shape[1] // grad.shape[1]
        spread = (grad * ctx.scale).unsqueeze(1).expand(-1, chunks, -1).reshape(keep.shape)  # (B, K W)
        return torch.where(keep, spread, 0), None, None, None


class Dropout(nn.Module):
    """nn.Dropout(p) with a cheaper CPU mask (module docstring); a drop-in: same attribute `p`, no state."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p == 1.0:
            return F.dropout(x, self.p, training=True)
        keep = 1.0 - self.p
        return _KeepAndScale.apply(x, keep_mask(x.shape, keep), 1.0 / keep)

    def sum_chunks(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        """This dropout of x (B, K W), then its K column blocks of width W summed: (B, W)."""
        batch = x.shape[0]
        if self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu":
            keep = 1.0 - self.p
            return _KeepSumScale.apply(x, keep_mask(x.shape, keep), 1.0 / keep, chunks)
        return self(x).view(batch, chunks, -1).sum(dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}"
