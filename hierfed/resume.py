"""Run checkpoints: everything the future of a run depends on, written atomically.

Layout::

    <run>/checkpoints/round-0003/{state.safetensors,state.json}   the carried state
    <run>/checkpoints/LATEST                                      names the newest complete one
    <run>/checkpoints/metrics.log, ledger.log                     append-only, one JSON line each

A checkpoint is first written into a hidden temporary folder, fsynced, renamed into place,
and only then does ``LATEST`` move (``os.replace``): a crash at any point leaves the previous
checkpoint usable. One checksum covers each state pair (``hierfed.checkpoint``); nothing is
pickled, and the loader builds only allow-listed types.

What is saved: the topology's carried state (all tiers' component states, server-optimizer and
aggregator states, local components, privacy accountants), the round counter, the simulated
clock and the latest DP reports. The metrics history and the ledger grow every round, so they
are not rewritten: each checkpoint appends the new records to the two logs and stores, per
log, its length in bytes and records and the sha256 of that prefix. Resuming verifies the
prefix and cuts off whatever a crashed round appended after it. Randomness needs no saving:
every draw is keyed by (seed, round, node, purpose).

Before anything is built from a checkpoint, ``read_latest`` checks: ``LATEST`` names a
``round-NNNN`` folder inside the run folder; the checksum; the config fingerprint; then the
round (an integer in [1, rounds], the folder's own), the clock and the log lengths.

``HIERFED_FAULT`` (environment, driver only) kills the driver with SIGKILL at a chosen point,
for the kill-and-resume tests: ``after-round:R``, ``in-checkpoint:R`` (tensor file written,
not yet committed), ``before-latest:R`` (checkpoint folder in place, LATEST not yet moved).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hierfed.checkpoint import atomic_write_text, load_state_flat, pack, save_bundle, unpack
from hierfed.errors import CheckpointError
from hierfed.ledger import CommLedger, Transfer

CKPT_DIR = "checkpoints"
LOGS = ("metrics", "ledger")
_NAME = re.compile(r"round-(\d{4,9})")


def fault_point(name: str, rnd: int) -> None:
    """SIGKILL this process if ``HIERFED_FAULT`` names this point (testing hook)."""
    if os.environ.get("HIERFED_FAULT") == f"{name}:{rnd}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- append-only logs


@dataclass
class _Log:
    """What this process knows of one log file: its committed length and running hash."""

    nbytes: int
    records: int
    hasher: Any  # hashlib sha256 over the first ``nbytes`` bytes

    def mark(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "records": self.records, "sha256": self.hasher.hexdigest()}


_OPEN: dict[str, _Log] = {}  # resolved log path -> state, for the run folders this process writes


def _log_path(run_dir: Path, name: str) -> Path:
    return run_dir / CKPT_DIR / f"{name}.log"


def _metrics_line(rec: Any) -> str:
    tensors: dict[str, Any] = {}
    packed = pack(rec, tensors)
    if tensors:
        raise CheckpointError("a metrics record holds a tensor; metrics must be plain numbers")
    return json.dumps(packed, sort_keys=True, allow_nan=False)


def _ledger_line(t: Transfer) -> str:
    return json.dumps([getattr(t, f) for f in Transfer.__dataclass_fields__])


def _open_prefix(
    path: Path, mark: dict[str, Any] | None, *, cut: bool = True
) -> tuple[_Log, bytes]:
    """Verify the first ``mark['nbytes']`` bytes of a log and (``cut``) cut off anything after
    them; ``cut=False`` only reads (an older checkpoint of a finished run)."""
    if mark is None:
        mark = {"nbytes": 0, "records": 0, "sha256": hashlib.sha256().hexdigest()}
    n = mark.get("nbytes")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise CheckpointError(f"checkpoint gives {path.name} an invalid length {n!r}")
    data = b""
    if n:
        try:
            with path.open("rb") as fh:
                data = fh.read(n)
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    hasher = hashlib.sha256(data)
    if len(data) != n or hasher.hexdigest() != mark.get("sha256"):
        raise CheckpointError(
            f"{path} is truncated or corrupted (its first {n} bytes do not match the checkpoint)"
        )
    if data.count(b"\n") != mark.get("records"):
        raise CheckpointError(f"{path} does not hold the {mark.get('records')} records expected")
    if cut:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:  # drop what a round appended after this checkpoint
            fh.truncate(n)
    return _Log(n, int(mark["records"]), hasher), data


def _append(path: Path, log: _Log, lines: list[str]) -> None:
    if not lines:
        return
    blob = "".join(line + "\n" for line in lines).encode()
    with path.open("ab") as fh:
        if fh.tell() != log.nbytes:
            fh.truncate(log.nbytes)
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    log.nbytes += len(blob)
    log.records += len(lines)
    log.hasher.update(blob)


def _log_state(run_dir: Path, name: str) -> _Log:
    """The log as the newest committed checkpoint left it (cached within this process)."""
    path = _log_path(run_dir, name)
    key = str(path.resolve())
    log = _OPEN.get(key)
    size = path.stat().st_size if path.exists() else 0
    if log is None or size != log.nbytes:
        marks = None
        if (run_dir / CKPT_DIR / "LATEST").is_file():
            marks = _read(run_dir, fingerprint=None, rounds=None)[1]
        log, _ = _open_prefix(path, (marks or {}).get(name))
        _OPEN[key] = log
    return log


# ---------------------------------------------------------------- writing


def write_checkpoint(run_dir: Path, rnd: int, bundle: dict[str, Any], keep: int) -> Path:
    """Commit round ``rnd``: append the new metrics and ledger records to the logs, write the
    carried state, move LATEST. ``bundle['metrics']`` (the whole list) and
    ``bundle['ledger']`` (the CommLedger) are read only from where the logs end."""
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    bundle = dict(bundle)
    metrics, ledger = bundle.pop("metrics"), bundle.pop("ledger")
    marks = {}
    for name, items, line in (
        ("metrics", list(metrics), _metrics_line),
        ("ledger", list(ledger.records), _ledger_line),
    ):
        log = _log_state(run_dir, name)
        _append(_log_path(run_dir, name), log, [line(x) for x in items[log.records :]])
        marks[name] = log.mark()
    bundle["logs"] = marks
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
    rounds = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))
    for old in rounds[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".round-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


# ---------------------------------------------------------------- reading


def _round_folder(run_dir: Path, rnd: int) -> tuple[Path, int]:
    folder = run_dir / CKPT_DIR / f"round-{rnd:04d}"
    if folder.is_symlink() or not folder.is_dir():
        raise CheckpointError(f"'{run_dir}' keeps no checkpoint of round {rnd} ({folder})")
    return folder, rnd


def _latest_folder(run_dir: Path) -> tuple[Path, int]:
    root = run_dir / CKPT_DIR
    latest = root / "LATEST"
    if not latest.is_file():
        raise CheckpointError(f"'{run_dir}' has no checkpoint to resume from ({latest} is missing)")
    try:
        name = latest.read_bytes()[:64].decode("ascii").strip()
    except UnicodeDecodeError:
        name = "?"
    folder = root / name
    m = _NAME.fullmatch(name)
    if (
        m is None
        or folder.is_symlink()
        or not folder.is_dir()
        or folder.resolve().parent != root.resolve()
    ):
        raise CheckpointError(
            f"{latest} names '{name}', which is not a checkpoint folder (round-NNNN) in {root}"
        )
    return folder, int(m.group(1))


def _read(
    run_dir: Path, *, fingerprint: str | None, rounds: int | None, rnd: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bundle with the topology state still packed, log marks), all checks done; the newest
    checkpoint, or round ``rnd``'s."""

    folder, rnd_of_name = _latest_folder(run_dir) if rnd is None else _round_folder(run_dir, rnd)
    tensors, meta = load_state_flat(folder / "state")  # the checksum, before anything is built
    tree = meta.get("tree")
    fields = tree.get("__d__") if isinstance(tree, dict) else None
    if not isinstance(fields, dict) or "round" not in fields:
        raise CheckpointError(
            f"checkpoint {folder} has no round counter; it is not a hierfed run checkpoint"
        )
    if fingerprint is not None and fields.get("config") != fingerprint:
        raise CheckpointError(
            f"the checkpoint in '{run_dir}' was written with another config; resume with the "
            "run folder's own config.yaml (python -m hierfed run --resume RUN_DIR)"
        )
    rnd = fields["round"]
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd != rnd_of_name or rnd < 1:
        raise CheckpointError(f"checkpoint {folder} gives round {rnd!r}; expected {rnd_of_name}")
    if rounds is not None and rnd > rounds:
        raise CheckpointError(
            f"checkpoint {folder} is after round {rnd} but the run has rounds={rounds}"
        )
    scalars = {k: unpack(fields[k], {}) for k in ("sim_total",) if k in fields}
    sim = scalars.get("sim_total")
    if (
        not isinstance(sim, (int, float))
        or isinstance(sim, bool)
        or not (math.isfinite(sim) and sim >= 0)
    ):
        raise CheckpointError(f"checkpoint {folder} has an invalid clock sim_total={sim!r}")
    marks = unpack(fields.get("logs"), {})
    if (
        not isinstance(marks, dict)
        or set(marks) != set(LOGS)
        or not all(isinstance(m, dict) for m in marks.values())
    ):
        raise CheckpointError(f"checkpoint {folder} does not describe its {list(LOGS)} logs")
    if marks["metrics"].get("records") != rnd + 1:  # round 0's evaluation, then one per round
        raise CheckpointError(f"checkpoint {folder} does not hold {rnd + 1} metrics records")
    return {"tree": fields, "tensors": tensors}, marks


def read_latest(
    run_dir: Path, *, fingerprint: str | None = None, rounds: int | None = None
) -> dict[str, Any]:
    """The newest committed checkpoint of ``run_dir`` with its metrics list and ledger;
    CheckpointError if none is usable. With ``fingerprint`` it must match the checkpoint's
    config; with ``rounds`` the checkpoint's round must not exceed it. The logs are cut back
    to the checkpoint's length (a later, uncommitted round's records are dropped)."""
    raw, marks = _read(run_dir, fingerprint=fingerprint, rounds=rounds)
    return _with_logs(run_dir, raw, marks, writing=True)


def read_checkpoint(run_dir: Path, rnd: int) -> dict[str, Any]:
    """Round ``rnd``'s kept checkpoint of ``run_dir`` (not only the newest) with the metrics
    and ledger up to it, every check of ``read_latest`` done; read only: nothing in
    ``run_dir`` changes (unlearning replays another run from it)."""
    raw, marks = _read(run_dir, fingerprint=None, rounds=None, rnd=rnd)
    return _with_logs(run_dir, raw, marks, writing=False)


def _with_logs(
    run_dir: Path, raw: dict[str, Any], marks: dict[str, Any], *, writing: bool
) -> dict[str, Any]:
    """The unpacked bundle plus its metrics and ledger read from the logs' verified prefixes
    (``writing``: the logs are cut there and this process appends to them next)."""
    fields, tensors = raw["tree"], raw["tensors"]
    bundle = {k: unpack(v, tensors) for k, v in fields.items() if k != "logs"}
    if not isinstance(bundle.get("topology"), dict) or not isinstance(bundle.get("dp_seen"), dict):
        raise CheckpointError(f"checkpoint in '{run_dir}' lacks its topology or privacy state")
    logs = {}
    for name in LOGS:
        path = _log_path(run_dir, name)
        log, data = _open_prefix(path, marks[name], cut=writing)
        if writing:
            _OPEN[str(path.resolve())] = log
        logs[name] = data.decode().splitlines()
    try:
        bundle["metrics"] = [unpack(json.loads(x), {}) for x in logs["metrics"]]
        rows = [json.loads(x) for x in logs["ledger"]]
        bundle["ledger"] = CommLedger(Transfer(*row) for row in rows)
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"a run log in '{run_dir}' is malformed: {exc}") from None
    if [m.get("round") if isinstance(m, dict) else None for m in bundle["metrics"]] != list(
        range(int(bundle["round"]) + 1)
    ):
        raise CheckpointError(f"the metrics log in '{run_dir}' does not run from round 0 in order")
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
    return hashlib.sha256(config_yaml.encode()).hexdigest()[:16]


def forget_logs(run_dir: Path) -> None:
    """Drop what this process cached about ``run_dir``'s logs (its folder was just claimed)."""
    for name in LOGS:
        _OPEN.pop(str(_log_path(Path(run_dir), name).resolve()), None)
