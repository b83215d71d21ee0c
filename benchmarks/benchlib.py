"""Shared helpers of the benchmark entry point: run one measurement as a child process, describe the machine.

Standard library only (also imported by the FuxiCTR peer, which runs in its own virtual environment).

Peak memory of a measurement is its own: the child is reaped with ``os.wait4``, whose ``ru_maxrss``
is the largest resident set of that child and of the processes it waited for (Linux), and its
anonymous resident memory (``RssAnon``, i.e. without file-backed pages such as memory-mapped
feature files) is sampled over the child's whole process tree every 50 ms.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
WORK = BENCH_DIR / "work"
RESULTS = BENCH_DIR / "results"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            text = (task / "children").read_text().split()
            found.extend(int(x) for x in text)
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (best effort: processes may exit while we look)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(_children(current))
    return out


def run_measured(argv: list[str], log_path: Path | None = None, nice: int = 0,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> dict[str, Any]:
    """Run argv as a child process; returns its exit code, wall/CPU seconds and peak memory (MiB).

    stdout and stderr go to `log_path` (or are inherited). `nice` > 0 lowers the child's priority
    (the machine is shared).
    """
    def lower_priority() -> None:
        if nice:
            os.nice(nice)

    log = open(log_path, "w") if log_path else None  # noqa: SIM115 - closed below
    started = time.perf_counter()
    try:
        process = subprocess.Popen(argv, stdout=log or None, stderr=subprocess.STDOUT if log else None,
                                   preexec_fn=lower_priority, env=env, cwd=cwd)
        peak_anon = peak_tree_rss = 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            tree = _tree(process.pid)
            peak_anon = max(peak_anon, sum(_status_kib(p, "RssAnon:") for p in tree))
            peak_tree_rss = max(peak_tree_rss, sum(_status_kib(p, "VmRSS:") for p in tree))
            time.sleep(0.05)
    finally:
        if log:
            log.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": process.returncode,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024),  # KiB on Linux; largest single process of the tree
        "peak_tree_rss_mib": round(peak_tree_rss / 1024),  # sampled sum over the tree (incl. mapped files)
        "peak_anon_rss_mib": round(peak_anon / 1024),  # sampled sum over the tree, anonymous pages only
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float:
    return round(_status_like("/proc/meminfo", "MemTotal:") / 2**20, 1)


def _status_like(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, load, Python, torch version and threads, GPU name if any."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "ram_gib": _mem_total_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # the machine is shared: timings are noisy
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - the peer venv has torch too
        info["torch"] = None
    return info


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
