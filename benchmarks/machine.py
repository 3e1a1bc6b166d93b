"""Machine facts written into every results file: CPUs, memory, load, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The checked-out commit, with ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """A snapshot; call it before and after a measurement to bracket the load."""
    return {
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "cpu_count_physical": psutil.cpu_count(logical=False),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "ray", "flwr", "peft", "numpy")},
        "git_commit": git_commit(),
    }


def shared_cpu_note(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A sentence for reports when other work shared the CPUs (1-minute load > 1 before the run)."""
    load = before["load_avg_1_5_15"][0]
    if load > 1.0:
        return (
            f"NOTE: the CPUs were shared with other work during this measurement (1-min load average "
            f"{load} before, {after['load_avg_1_5_15'][0]} after, on {before['cpu_count_logical']} logical CPUs); "
            f"timings are inflated and noisy."
        )
    return f"Load average before {load}, after {after['load_avg_1_5_15'][0]} on {before['cpu_count_logical']} logical CPUs."
