"""Files qin ships beside its code: the reference config qin.yaml and configs/*.yaml.

A checkout has them at the repository root; a wheel carries copies under qin/defaults/ (setup.py puts
them there). Either way, `-c qin.yaml` or `-c configs/demo.yaml` from a folder without them uses qin's
own copy, so qin runs from an empty folder.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(path: Path) -> Path:
    """`path` if it exists (or is absolute); else qin's own copy of that relative name, if it has one."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    packaged = files("qin") / "defaults" / path.as_posix()
    if packaged.is_file():
        return Path(str(packaged))
    # An editable install runs from a checkout, which has no qin/defaults/: the files are at its root.
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / path).is_file():
        return root / path
    return path
