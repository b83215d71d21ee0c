"""Files qin ships inside its package: the reference config qin.yaml and configs/*.yaml.

A checkout has them at the repository root; a wheel carries copies under qin/defaults/ (setup.py puts
them there). `-c qin.yaml` or `-c configs/demo.yaml` from a folder without them uses the packaged copy,
so an installed qin runs from an empty folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(path: Path) -> Path:
    """`path` if it exists (or is absolute); else qin's packaged copy of that relative name, if any."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    packaged = files("qin") / "defaults" / path.as_posix()
    return Path(str(packaged)) if packaged.is_file() else path
