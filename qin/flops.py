"""Counted FLOPs per sample of a training step and the measured matmul peak that model FLOPs utilisation
(MFU) is taken against.

Convention (the one MFU uses): FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, which counts
only the matmul/convolution-like operators (mm, addmm, bmm, baddbmm, matmul-based einsum, convolutions,
scaled-dot-product attention, ...), at 2 FLOPs per multiply-add. Elementwise work (activations, BatchNorm,
dropout, the quadratic layers' products, the loss, the L2 regulariser), reductions, embedding gathers and
their scatter-add backward, torch.unique and the optimizer are NOT counted. They are real time on the
device, but not "model FLOPs": counting them would let memory-bound work inflate the utilisation.

The counts are of the operators the model actually runs on the batch given (FlopCounterMode runs the real
computation), not a formula: a model's fast path over the batch's unique items (`ModelConfig.unique_items`)
projects each distinct item once, so its FLOPs per sample depend on how many distinct items the batch holds
(fewer per row in a larger batch with popular items), and the count is only valid for batches like it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from qin.batch import Batch
from qin.config import Regularization, TrainConfig
from qin.model import CTRModel
from qin.runtime import autocast_context

Shape = tuple[int, ...]


# Attention kernels torch's counter has no formula for, so it would count them as 0. CPU scaled-dot-product
# attention (used when the Transformer models run without dropout, e.g. in eval mode) is the same
# computation as the CUDA flash/efficient kernels it does count: give it torch's own formulas for those
# (QK^T and AV; in the backward pass the recomputed scores and the four gradient products). The counter
# calls a formula with the op's arguments (tensors replaced by their shapes) and the output's shape.
def _cpu_sdpa_forward(query: Shape, key: Shape, value: Shape, dropout_p: float = 0.0, is_causal: bool = False,
                      *, attn_mask: Shape | None = None, scale: float | None = None,
                      out_shape: object = None) -> int:
    return int(sdpa_flop_count(query, key, value))


def _cpu_sdpa_backward(grad_out: Shape, query: Shape, key: Shape, value: Shape, out: Shape, logsumexp: Shape,
                       dropout_p: float = 0.0, is_causal: bool = False, *, attn_mask: Shape | None = None,
                       scale: float | None = None, out_shape: object = None) -> int:
    return int(sdpa_backward_flop_count(grad_out, query, key, value))


_EXTRA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per sample (batch row) of one training step, and the batch they were counted on.

    forward: the training forward pass, loss included (train mode, autograd recording).
    backward: loss.backward() of that forward.
    inference: the scoring forward pass (eval mode, no gradient, no loss). Equal to `forward` for most
        models, because the loss and the train/eval differences (dropout, BatchNorm statistics) are
        elementwise; not for QNN-alpha, whose training loss (Self-Ensemble) runs its tower twice.
    The optimizer step is excluded (elementwise: it would count 0 anyway).
    """

    forward: float
    backward: float
    inference: float
    batch_size: int  # B: rows of the batch counted on
    history_slots: int  # L: history slots per row
    mean_history_items: float  # real (non-padding) history items per row
    unique_item_ids: int  # U: distinct ids among targets and history, padding id 0 included

    @property
    def train(self) -> float:
        """Forward + backward per sample: what one sample costs a training step."""
        return self.forward + self.backward

    def as_dict(self) -> dict[str, float | int]:
        """A JSON-ready record (benchmark files): the counts, their sum and the batch statistics."""
        return {"forward": self.forward, "backward": self.backward, "train": self.train,
                "inference": self.inference, "batch_size": self.batch_size,
                "history_slots": self.history_slots, "mean_history_items": self.mean_history_items,
                "unique_item_ids": self.unique_item_ids}


def train_flops_per_sample(model: CTRModel, batch: Batch, train_cfg: TrainConfig | None = None) -> FlopCount:
    """Counted FLOPs per sample of one training step of `model` on `batch` (forward + backward, loss
    included, optimizer excluded) and of scoring it (forward only). See the module docstring for what
    FlopCounterMode counts.

    The loss is built as `qin.train.make_train_step` builds it: data loss under the step's autocast, plus
    the embedding and net L2 terms when `train_cfg` sets them (elementwise, so they add no counted FLOPs,
    but they are in the graph the backward pass runs). With `train_cfg` None: data loss only, no autocast.
    Autocast changes dtypes, not the operators, so the count is the same with or without bf16.

    QIN and the other models with `unique_items` project item vectors (and ASTA's keys and values) once
    per distinct item of the batch: the count then depends on the batch's number of distinct items and is
    valid for batches like the one given (same size, same item popularity); the result records them.

    Counting runs on a deep copy of the model, under a forked RNG: the model's weights, gradients and
    BatchNorm statistics and the caller's random stream are left as they were.

    Scoring is counted with the nn.MultiheadAttention / TransformerEncoderLayer inference fast path
    switched off: the fused kernels it calls have no FLOP formula (they would count 0); the unfused path
    runs the same matmuls over the padded history, which is what is counted (the fast path may skip the
    padded slots, so it can do less).
    """
    device = next(model.parameters()).device
    batch = batch.to(device)
    rows = batch.size
    # A copy: the training forward updates BatchNorm running statistics and backward writes .grad.
    counted = copy.deepcopy(model)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # dropout draws must not shift the caller's stream
        counted.train()
        with _counter() as forward_counter:
            loss = _training_loss(counted, batch, train_cfg, device)
        with _counter() as backward_counter:
            loss.backward()
        counted.eval()
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with _counter() as inference_counter, torch.no_grad(), _autocast(device, train_cfg):
                counted(batch)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    real = batch.history != 0
    ids = torch.cat([batch.history.reshape(-1), batch.target_item])
    return FlopCount(
        forward=forward_counter.get_total_flops() / rows,
        backward=backward_counter.get_total_flops() / rows,
        inference=inference_counter.get_total_flops() / rows,
        batch_size=rows,
        history_slots=batch.history.shape[1],
        mean_history_items=float(real.sum(dim=1).float().mean()),
        unique_item_ids=int(torch.unique(ids).numel()),
    )


def _training_loss(model: CTRModel, batch: Batch, train_cfg: TrainConfig | None,
                   device: torch.device) -> torch.Tensor:
    """The scalar make_train_step calls backward on (kept in step with qin/train/step.py by hand)."""
    with _autocast(device, train_cfg):
        data_loss, _ = model.loss(batch)
    loss = data_loss.float()
    if train_cfg is None:
        return loss
    if train_cfg.embedding_regularizer > 0:
        used = batch if train_cfg.regularization is Regularization.batch else None
        loss = loss + 0.5 * train_cfg.embedding_regularizer * model.embedding_l2(used)
    if train_cfg.net_regularizer > 0:
        embedding_ids = {id(p) for p in model.embedding_parameters()}
        net = [p for p in model.parameters() if id(p) not in embedding_ids]
        loss = loss + 0.5 * train_cfg.net_regularizer * sum(p.pow(2).sum() for p in net)
    return loss


def _counter() -> FlopCounterMode:
    """A silent counter that also knows the CPU attention kernels (see _EXTRA_FORMULAS)."""
    return FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)


def _autocast(device: torch.device, train_cfg: TrainConfig | None) -> contextlib.AbstractContextManager:
    """The step's autocast (bf16 on CUDA with train.bf16, on CPU with train.cpu_bf16), or none without a
    train config."""
    return contextlib.nullcontext() if train_cfg is None else autocast_context(device, train_cfg)


def default_peak_size(device: torch.device) -> int:
    """Matmul side for `measured_peak_flops`: large enough to saturate the device, short enough to time.

    8192 on CUDA (1.1 TFLOP per product: ms on a datacenter GPU); 2048 on CPU (17 GFLOP: a fraction of a
    second on a few cores).
    """
    return 8192 if device.type == "cuda" else 2048


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None,
                        repeats: int = 5) -> float:
    """Achievable matmul throughput of `device` in `dtype`, FLOP/s, measured: the best of `repeats` timings
    of a square `size` x `size` matmul (2 size^3 FLOPs each), after a warm-up.

    MFU in this project is achieved model FLOP/s over THIS number, not over the datasheet peak: it says how
    much of what the device's matmul unit really delivers (with this torch build, these threads, this
    dtype, whatever else runs on the machine) the model uses, so it reads higher than an MFU against the
    datasheet. The best (not the mean) timing is taken because the peak is a capability: interference
    only slows a run.
    Float32 matmuls on CUDA use TF32 when torch.backends.cuda.matmul allows it, as the model's matmuls do.
    """
    size = default_peak_size(device) if size is None else size
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got size={size}, repeats={repeats}")
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty(size, size, device=device, dtype=dtype)
    # Several products per timing on CUDA, so the launch and synchronisation overhead is amortised.
    per_timing = 10 if device.type == "cuda" else 1

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=out)  # warm-up: allocator, library kernel selection, CPU thread pool start
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_timing):
            torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * per_timing / best
