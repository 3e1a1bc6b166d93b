"""Machine facts written into every results file: CPUs, memory, load, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
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


# what a report needs from a machine_info() record to say where and on what code it ran
PROVENANCE_KEYS = ("cpu_count_logical", "memory_total_gib", "platform", "git_commit", "time_utc")


def provenance(
    machine: Mapping[str, Any], until: Mapping[str, Any] | None = None, *, source: str = ""
) -> str:
    """The sentence a report prints to name the machine and commit its figures came from.

    ``machine`` is a :func:`machine_info` record read back from a results file (before the
    measurement, or the only one, taken as it ended); ``until`` is the record taken after it,
    or None. ``source`` says where the record sits in the results file, so a reader can check
    it (e.g. ``"`machine` in results.json"``). Neither record is mutated. The load average is
    printed when recorded. A record lacking one of ``PROVENANCE_KEYS`` raises ValueError.

    >>> m = {"cpu_count_logical": 2, "memory_total_gib": 23.5, "platform": "Linux",
    ...      "git_commit": "0123abc", "time_utc": "2026-01-01T00:00:00+00:00"}
    >>> provenance(m)
    'Machine: 2 logical CPUs, 23.5 GiB, Linux; commit `0123abc`; 2026-01-01T00:00:00+00:00.'
    """
    records = [("machine", machine)] + ([("until", until)] if until is not None else [])
    for name, rec in records:
        missing = [k for k in PROVENANCE_KEYS if k not in rec]
        if missing:
            raise ValueError(
                f"{name} record lacks {', '.join(missing)} (has {', '.join(rec) or 'nothing'}); "
                "pass a record written by benchmarks.machine.machine_info()"
            )
    commit = f"commit `{machine['git_commit']}`"
    when = machine["time_utc"]
    load = machine.get("load_avg_1_5_15")
    load_text = f"load average (1, 5, 15 min) {load}" if load is not None else ""
    if until is not None:
        if until["git_commit"] != machine["git_commit"]:
            commit += f" (`{until['git_commit']}` at the end)"
        when += f" -> {until['time_utc']}"
        if load is not None and until.get("load_avg_1_5_15") is not None:
            load_text += f" before, {until['load_avg_1_5_15']} after"
    label = f"Machine ({source})" if source else "Machine"
    parts = [
        f"{label}: {machine['cpu_count_logical']} logical CPUs, {machine['memory_total_gib']} GiB, "
        f"{machine['platform']}",
        commit,
        when,
    ]
    return "; ".join(parts + ([load_text] if load_text else [])) + "."
