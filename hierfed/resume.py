"""Run checkpoints: everything the future of a run depends on, written atomically.

Layout: ``<run>/checkpoints/round-0003/{state.safetensors,state.json}`` plus
``<run>/checkpoints/LATEST`` naming the newest complete one. A checkpoint is first written
into a hidden temporary folder, fsynced, renamed into place, and only then does ``LATEST``
move (``os.replace``): a crash at any point leaves the previous checkpoint usable. Each
tensor file is checksummed in its JSON; a corrupted or truncated checkpoint is refused,
never partly loaded. Nothing is pickled (``hierfed.checkpoint.pack``).

What is saved: the topology's carried state (all tiers' component states, server-optimizer
and aggregator states, local components, privacy accountants), the ledger, the metrics so
far, the round counter and the simulated clock. Randomness needs no saving: every draw is
keyed by (seed, round, node, purpose).

``HIERFED_FAULT`` (environment, driver only) kills the driver with SIGKILL at a chosen point,
for the kill-and-resume tests: ``after-round:R``, ``in-checkpoint:R`` (tensor file written,
not yet committed), ``before-latest:R`` (checkpoint folder in place, LATEST not yet moved).
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

from hierfed.checkpoint import atomic_write_text, load_bundle, save_bundle
from hierfed.errors import CheckpointError
from hierfed.ledger import CommLedger, Transfer

CKPT_DIR = "checkpoints"


def fault_point(name: str, rnd: int) -> None:
    """SIGKILL this process if ``HIERFED_FAULT`` names this point (testing hook)."""
    if os.environ.get("HIERFED_FAULT") == f"{name}:{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


def ledger_columns(ledger: CommLedger) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {f: [] for f in Transfer.__dataclass_fields__}
    for r in ledger.records:
        for f in cols:
            cols[f].append(getattr(r, f))
    return cols


def ledger_from_columns(cols: dict[str, list[Any]]) -> CommLedger:
    names = list(Transfer.__dataclass_fields__)
    return CommLedger(Transfer(*row) for row in zip(*(cols[n] for n in names)))


def write_checkpoint(run_dir: Path, rnd: int, bundle: dict[str, Any], keep: int) -> Path:
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"round-{rnd:04d}"
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_bundle(tmp, "state", bundle)
    fault_point("in-checkpoint", rnd)
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    fault_point("before-latest", rnd)
    atomic_write_text(root / "LATEST", name + "\n")
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-"))[
        :-keep
    ]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".round-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_latest(run_dir: Path) -> dict[str, Any]:
    """The newest committed checkpoint of ``run_dir``; CheckpointError if none is usable."""
    root = run_dir / CKPT_DIR
    latest = root / "LATEST"
    if not latest.is_file():
        raise CheckpointError(f"'{run_dir}' has no checkpoint to resume from ({latest} is missing)")
    name = latest.read_text().strip()
    if not name.startswith("round-") or not (root / name).is_dir():
        raise CheckpointError(
            f"{latest} names '{name}', which is not a checkpoint folder in {root}"
        )
    bundle = load_bundle(root / name, "state")
    if not isinstance(bundle, dict) or "round" not in bundle:
        raise CheckpointError(
            f"checkpoint {root / name} has no round counter; it is not a hierfed run checkpoint"
        )
    return bundle


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def config_fingerprint(config_yaml: str) -> str:
    import hashlib

    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]
