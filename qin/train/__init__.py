"""Training: `fit` (the loop), one optimizer step, the resumable state, and `qin train` as a whole.

    step.py     one optimizer step, epoch batches, warm-up, the loss and one-class guards
    state.py    LoopState, FitResult, best.pt / last.pt, resume checks, result.json
    loop.py     fit: set up, epochs, evaluate-and-schedule, finish
    command.py  `qin train`: config and run folder, lock, features, fit
"""

from qin.train.command import train_command
from qin.train.loop import evaluate, fit
from qin.train.state import RUNTIME_KEYS, FitResult, LoopState, features_fingerprint, resume_differences
from qin.train.step import (
    apply_warmup,
    check_loss,
    check_two_classes,
    make_optimizer,
    make_train_step,
    shard_order,
)

__all__ = ["RUNTIME_KEYS", "FitResult", "LoopState", "apply_warmup", "check_loss", "check_two_classes",
           "evaluate", "features_fingerprint", "fit", "make_optimizer", "make_train_step",
           "resume_differences", "shard_order", "train_command"]
