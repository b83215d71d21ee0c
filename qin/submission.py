"""The challenge submission: its format, its paths, recognising qin's own files, writing it.

Submission format (docs/data.md section 3): header `ID,<column>` (Task2 by default), one row per test
row in test-row order, IDs 0..n-1, probabilities in [0, 1]. The file is validated before it is
moved into place, and a JSON sidecar records where it came from and each file's sha256.

Outputs never replace what qin did not write: `--out` must end in .csv, and an existing file at
it, at its sidecar (.json) or at its zip (.zip) is replaced only when it is a regular file that
looks like an earlier qin output of that kind. Anything else (a folder, a device such as
/dev/stdout, a symbolic link, someone's own file) is refused before the model is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from qin.errors import QinError
from qin.files import atomic_write_bytes, atomic_write_text, check_replaceable, first_line
from qin.predict import LoadedRun, score_split
from qin.runs import git_commit

SUBMISSION_COLUMNS = ("Task1", "Task2", "Task1&2")


def submission_paths(out: Path, make_zip: bool) -> dict[str, Path]:
    """The files `write_submission` writes, checked before any work: {"submission", "sidecar"[, "zip"]}.

    Raises:
        QinError: `out` does not end in .csv, or one of the paths holds something qin may not replace.
    """
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise QinError(f"{out}: a submission is a .csv file (its sidecar .json and zip .zip sit beside it); "
                       "use --out NAME.csv")
    paths = {"submission": out, "sidecar": out.with_suffix(".json")}
    if make_zip:
        paths["zip"] = out.with_suffix(".zip")
    check_replaceable(paths["submission"], _is_submission_csv, "a submission qin wrote (its .json "
                                                               "sidecar records its sha256)")
    check_replaceable(paths["sidecar"], _is_sidecar, "a qin submission sidecar")
    if make_zip:
        check_replaceable(paths["zip"], _is_submission_zip, "a submission zip holding prediction.csv")
    return paths


def _is_submission_csv(path: Path) -> bool:
    """A submission qin wrote: its header is ID,<column> and its sidecar records its sha256."""
    header_ok = first_line(path).rstrip("\r\n") in {f"ID,{column}" for column in SUBMISSION_COLUMNS}
    return header_ok and _recorded_by_sidecar(path, path.with_suffix(".json"), "submission")


def _recorded_by_sidecar(path: Path, sidecar_path: Path, name: str) -> bool:
    """Whether the sidecar beside `path` records `path`'s current sha256 (new or about to be replaced)."""
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(sidecar, dict) or not isinstance(sidecar.get("sha256"), dict):
        return False
    digest = _sha256_or_none(path)
    return digest is not None and digest in (sidecar["sha256"].get(name),
                                             (sidecar.get("replaces_sha256") or {}).get(name))


def _sha256_or_none(path: Path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _is_sidecar(path: Path) -> bool:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and "submission" in content and "run_dir" in content


def _is_submission_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.namelist() != ["prediction.csv"]:
                return False
    except (OSError, zipfile.BadZipFile):
        return False
    return _recorded_by_sidecar(path, path.with_suffix(".json"), "zip")


def validate_submission(frame: pl.DataFrame, expected_rows: int, column: str) -> None:
    """Raise QinError unless `frame` is a valid challenge submission."""
    if frame.columns != ["ID", column]:
        raise QinError(f"submission columns must be ['ID', '{column}'], got {frame.columns}")
    if frame.height != expected_rows:
        raise QinError(f"submission has {frame.height} rows, the test split has {expected_rows}")
    ids = frame["ID"].to_numpy()
    bad_id = np.flatnonzero(ids != np.arange(expected_rows))
    if bad_id.size:
        raise QinError(f"submission ID must be 0..{expected_rows - 1} in test-row order; row {bad_id[0]} "
                       f"has ID {ids[bad_id[0]]}")
    values = frame[column].to_numpy()
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0) | (values > 1))
    if bad.size:
        raise QinError(f"submission {column} must be probabilities in [0, 1]; "
                       f"row {bad[0]} has {values[bad[0]]}")


def write_submission(run: LoadedRun, out: Path, column: str = "Task2",
                     make_zip: bool = False) -> dict[str, Any]:
    """Score the test split, validate, write `out` (+ `out`.zip, + `out`.json sidecar) atomically."""
    if column not in SUBMISSION_COLUMNS:
        raise QinError(f"--column must be one of {', '.join(SUBMISSION_COLUMNS)}, got {column!r}")
    paths = submission_paths(out, make_zip)
    test = run.features.split("test")
    probabilities = score_split(run, "test")
    ids = np.asarray(test.ids) if test.ids is not None else np.arange(len(probabilities))
    frame = pl.DataFrame({"ID": ids.astype(np.int64), column: probabilities})
    validate_submission(frame, expected_rows=len(probabilities), column=column)
    buffer = io.BytesIO()
    frame.write_csv(buffer, float_precision=8)
    out = Path(out)
    files = {"submission": (out, buffer.getvalue())}
    if make_zip:
        zipped = io.BytesIO()
        with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("prediction.csv", buffer.getvalue())  # the name Codabench expects, at the top
        files["zip"] = (paths["zip"], zipped.getvalue())
    # The sidecar records each file's sha256: it is how a later run knows a file at these paths is qin's
    # (a user's own ID,Task2 file looks the same). It is written first, naming the digests of the files
    # it is about to replace too, so a crash between the writes never makes qin's own file look foreign.
    sidecar: dict[str, Any] = {
        **{name: str(path) for name, (path, _) in files.items()}, "rows": frame.height, "column": column,
        "run_dir": str(run.run_dir),
        "checkpoint_epoch": run.checkpoint.get("epoch"), "valid_auc": run.checkpoint.get("valid_auc"),
        "valid_logloss": run.checkpoint.get("valid_logloss"), "feature_dir": str(run.features.dir),
        "config": run.config.to_dict(), "trained_at_commit": run.checkpoint.get("git_commit"),
        "git_commit": git_commit(),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, (_, data) in files.items()},
        "replaces_sha256": {name: _sha256_or_none(path) for name, (path, _) in files.items()},
    }
    atomic_write_text(paths["sidecar"], json.dumps(sidecar, indent=2, default=str))
    for path, data in files.values():
        atomic_write_bytes(path, data)
    sidecar["replaces_sha256"] = {name: None for name in files}
    atomic_write_text(paths["sidecar"], json.dumps(sidecar, indent=2, default=str))
    return sidecar
