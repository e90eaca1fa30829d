"""Helpers shared by the benchmarks: the machine a result came from, paths, result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def repo_relative(path: str | Path) -> str:
    """``path`` as seen from the repository root, so that results name no machine's layout."""
    try:
        return os.path.relpath(Path(path).resolve(), REPO)
    except ValueError:  # another drive (Windows): nothing relative exists
        return Path(path).name


def command_line(argv: list[str] | None = None) -> str:
    """The command that produced a result, runnable from the repository root."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", repo_relative(argv[0]), *argv[1:]])


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return platform.processor() or platform.machine()
    lines = cpuinfo.read_text().splitlines()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def machine_info() -> dict:
    import transformers

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_average() -> float | None:
    """The 1-minute load average: other processes on the machine make timings noisy."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_results(stem: Path, report: dict, markdown: str) -> None:
    """``stem.json`` (every raw number) and ``stem.md`` (the table a reader wants)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")  # not with_suffix: names may hold dots
    Path(f"{stem}.md").write_text(markdown)
