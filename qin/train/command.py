"""`qin train` as one library call: choose the config and run folder, lock it, build features, fit.

The order matters for a user: every check that can fail (a run folder that may not be used, no GPU
for `train.device: cuda`, changed raw data on `--resume`) comes before minutes of preprocessing or
training, and a run that fails before its first checkpoint leaves no folder behind.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from qin import distributed
from qin.checkpoints import load_checkpoint
from qin.config import Config
from qin.errors import QinError
from qin.features.folder import feature_dir_of
from qin.features.io import load_features
from qin.features.pipeline import build_features_for
from qin.packaged import config_path
from qin.runs import (
    RunLock,
    is_run_dir,
    new_run_dir,
    prepare_run_dir,
    remove_run_temp_files,
    remove_unstarted_run,
)
from qin.runtime import resolve_device
from qin.train.loop import fit
from qin.train.state import FitResult

DEFAULT_CONFIG = Path("qin.yaml")


def train_command(config: list[Path] | None, overrides: list[str], run_dir: Path | None, resume: Path | None,
                  overwrite: bool, progress: bool, console: Console) -> FitResult | None:
    """What `qin train` does; returns the result on rank 0 (None on the other torchrun processes)."""
    if resume is not None and (run_dir is not None or overwrite):
        raise QinError("--resume continues the run in its own folder; drop --run-dir / --overwrite")
    if resume is not None and resume.is_file():
        raise QinError(f"--resume takes the run folder, not a file: use --resume {resume.parent}")
    if resume is not None and not resume.is_dir():
        raise QinError(f"{resume}: no such run folder (--resume continues a run `qin train` started there)")
    if resume is not None and not is_run_dir(resume):
        raise QinError(f"{resume}: not a qin run folder (no config.yaml with checkpoints or metrics); "
                       "nothing to resume")
    dist = distributed.context()
    # Without -c a resumed run's own config.yaml is the config (no qin.yaml needed in the current folder).
    source = config or [resume / "config.yaml" if resume is not None else DEFAULT_CONFIG]
    # Paths become absolute before config.yaml is written, so a run resumes or predicts from any folder.
    cfg = Config.from_yaml([config_path(path) for path in source], overrides).with_absolute_paths()
    if dist.world_size == 1:
        resolve_device(cfg.train.device)  # no GPU for train.device=cuda: say so before preprocessing
    run_dir = resume if resume is not None else run_dir
    created = False
    if run_dir is None:
        run_dir, created = shared_run_dir(cfg, dist), True
    lock = RunLock(run_dir)
    if dist.is_main:
        created = lock.acquire() or created
    try:
        if dist.is_main:
            remove_run_temp_files(run_dir)  # left by a killed run; the lock says none is writing now
        if resume is None and dist.is_main:
            created = prepare_run_dir(run_dir, overwrite) or created
        result = _features_then_fit(cfg, run_dir, resume is not None, progress, dist, console)
    except (QinError, OSError, KeyboardInterrupt) as error:
        lock.release(failed=True)
        if created and dist.is_main:
            remove_unstarted_run(run_dir)  # a run that failed before its first checkpoint leaves nothing
        # After Ctrl-C or a full disk the run can go on as it was; a QinError needs a change first.
        if dist.is_main and not isinstance(error, QinError) and (run_dir / "last.pt").is_file():
            console.print(f"its last saved state is kept: continue with `qin train --resume {run_dir}`",
                          highlight=False, soft_wrap=True)
        raise
    lock.release()
    distributed.shutdown(dist)
    return result if dist.is_main else None


def _features_then_fit(cfg: Config, run_dir: Path, resume: bool, progress: bool, dist: distributed.Context,
                       console: Console) -> FitResult:
    """Features (rank 0 builds, the others wait), then `fit`; the run folder is locked by the caller."""
    # A resume refuses changed raw data before the shared feature folder is rebuilt for it.
    expected = recorded_sources(run_dir / "last.pt") if resume else None
    if dist.is_main:
        build_features_for(cfg.data, expected_sources=expected, progress=progress)
    if dist.world_size > 1:
        distributed.barrier(dist)
    return fit(cfg, load_features(feature_dir_of(cfg.data)), run_dir, resume=resume, progress=progress,
               console=console)


def recorded_sources(last: Path) -> dict[str, str] | None:
    """The raw files' sha256 recorded in a run's last.pt (None for runs from before they were recorded)."""
    if not last.is_file():
        return None  # `fit` says that the run cannot be resumed
    return load_checkpoint(last).get("feature_sources")


def shared_run_dir(cfg: Config, dist: distributed.Context) -> Path:
    """A new run folder, named by rank 0 and shared with the other torchrun processes."""
    if dist.world_size == 1:
        return new_run_dir(Path(cfg.train.run_root), cfg.model.name.value)
    import torch.distributed as torch_dist

    holder = [str(new_run_dir(Path(cfg.train.run_root), cfg.model.name.value)) if dist.is_main else None]
    torch_dist.broadcast_object_list(holder, src=0)
    shared = holder[0]
    if shared is None:  # broadcast_object_list gives every rank rank 0's entry, a path
        raise QinError("rank 0 did not share the run folder")
    return Path(shared)
