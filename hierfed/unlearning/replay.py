"""Exact unlearning: replay a finished run from its newest clean checkpoint, clients excluded.

Why it is exact: with ``exclude`` the excluded members are still drawn and only then dropped
(``hierfed.unlearning.exclusion``), so a run that excludes them from the start is the original
run, bit for bit, in every round before one of them is first drawn. A drawn member is broadcast
to, so the original run's ledger names the first round that used their data. The newest
checkpoint before that round is therefore also a checkpoint of the run that never had them:
it is copied into the new run folder under the new config's fingerprint, and the rounds after
it are replayed with them excluded. Round 0 (no clean checkpoint kept) replays from the
initial model.

Before a checkpoint is reused it is checked, not trusted: none of its ledger records names a
removed client or node, and its client store (local components, DP accountants) holds nothing
of theirs. A client whose components are all ``local`` gets no broadcast; its training still
shows in the client store, which is why both are checked.

The original run folder is only read. Gossip runs replay from round 0: an excluded gossip node
leaves the global mean from the first round on (see ``topologies/gossip.py``).

Checkpoint format: this module reads checkpoints only through ``_checkpoint_rounds``,
``_load_checkpoint`` (``hierfed.resume.read_checkpoint``: any kept round, read only) and
``_folder_sha256``, and writes one through ``write_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hierfed.config import RunConfig, load_config
from hierfed.data.federation import Federation
from hierfed.errors import CheckpointError, ConfigError, HierfedError
from hierfed.ledger import CommLedger
from hierfed.resume import CKPT_DIR, read_checkpoint, write_checkpoint
from hierfed.simulation import RunResult, _fingerprint, build_federation, run
from hierfed.unlearning.exclusion import excluded_clients, removable_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayPlan:
    """What an exact unlearning replays: decided from the original run folder alone."""

    removed: tuple[str, ...]  # the ids asked for (clients and tier nodes)
    clients: frozenset[str]  # every client they remove
    first_round: int | None  # first round that used their data (None: never)
    start_round: int  # the checkpoint replayed from (0 = the initial model)
    checkpoint: Path | None  # its folder in the original run
    rounds: int  # rounds of the run
    skipped: tuple[str, ...] = ()  # newer checkpoints refused by the check, with why

    @property
    def rounds_replayed(self) -> int:
        return self.rounds - self.start_round


@dataclass
class ReplayResult:
    plan: ReplayPlan
    cfg: RunConfig
    result: RunResult
    wall_s: float  # the replay, measured (time.perf_counter), start-up included
    checkpoint_sha256: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def names_any(name: str, ids: Sequence[str]) -> bool:
    """Whether a ledger endpoint ``name`` is one of ``ids`` or a node below one."""
    return any(name == x or name.startswith(x + "/") for x in ids)


def first_round_using(
    ledger: CommLedger, ids: Sequence[str], clients: frozenset[str]
) -> int | None:
    """The first round whose ledger names a removed id, a node below one, or a removed client."""
    rounds = [
        r.round
        for r in ledger.records
        if r.src in clients or r.dst in clients or names_any(r.src, ids) or names_any(r.dst, ids)
    ]
    return min(rounds, default=None)


def exclusion_config(
    cfg: RunConfig,
    federation: Federation,
    *,
    clients: Sequence[str],
    nodes: Sequence[str],
    out: Path,
) -> tuple[RunConfig, tuple[str, ...], frozenset[str]]:
    """The original config plus the exclusion, the ids removed now, and the clients they
    remove. ConfigError (key ``--client``/``--institution``) for an id of the wrong kind, one
    given twice or already excluded by the run; ``exclude``'s own checks for the rest."""
    known = removable_ids(federation)
    client_ids = {c.id for c in federation.clients}
    ids: list[str] = []
    for key, given, want in (("--client", clients, True), ("--institution", nodes, False)):
        for short in given:
            x = _resolve(key, short, known, client_ids, want)
            if (x in client_ids) != want:
                kind = "a client" if x in client_ids else "a tier node"
                other = "--client" if key == "--institution" else "--institution"
                raise ConfigError(key, x, f"is {kind}; pass it with {other}")
            if x in ids:
                raise ConfigError(key, x, "given twice; name each client or node once")
            ids.append(x)
    if not ids:
        raise ConfigError("--client", None, "name at least one --client or --institution to remove")
    before = excluded_clients(cfg, federation)
    for x in ids:
        if known[x] <= before:
            raise ConfigError(
                key="--client" if x in client_ids else "--institution",
                value=x,
                fix=f"already excluded by this run (exclude: {list(cfg.exclude)}); nothing to remove",
            )
    new = replace(cfg, exclude=[*cfg.exclude, *ids], out=str(out))
    removed = excluded_clients(new, federation) - before
    return new, tuple(ids), frozenset(removed)


def _resolve(
    key: str, x: str, known: Mapping[str, frozenset[str]], client_ids: set[str], want: bool
) -> str:
    """A full id, or the one id of the wanted kind that ends with ``/x`` (``inst-02`` for
    ``global/inst-02``); ConfigError if there is none or more than one."""
    if x in known:
        return x
    hits = sorted(k for k in known if (k in client_ids) == want and k.endswith("/" + x))
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ConfigError(
            key, x, f"matches {len(hits)} ids ({', '.join(hits[:3])}, ...); give the full id"
        )
    first = sorted(client_ids)[0]
    example = first if want else "/".join(first.split("/")[:2])
    raise ConfigError(key, x, f"the run has no such id; ids look like '{example}'")


# ---------------------------------------------------------------- checkpoint access (format)


def _checkpoint_rounds(run_dir: Path) -> dict[int, Path]:
    """Committed checkpoint folders of a run, by round."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return {}
    out = {}
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("round-") and p.name[6:].isdigit():
            out[int(p.name[6:])] = p
    return out


def _load_checkpoint(folder: Path) -> dict[str, Any]:
    """A kept checkpoint (``<run>/checkpoints/round-NNNN``) with the metrics and ledger up to
    it, checksum-verified and read only (``hierfed.resume.read_checkpoint``)."""
    return read_checkpoint(folder.parent.parent, int(folder.name[6:]))


def _folder_sha256(folder: Path) -> str:
    """One checksum over a checkpoint folder: sha256 of its files' names and sha256s, sorted."""
    h = hashlib.sha256()
    for p in sorted(x for x in folder.iterdir() if x.is_file()):
        h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).hexdigest().encode())
    return h.hexdigest()


def _clean(bundle: Mapping[str, Any], ids: Sequence[str], clients: frozenset[str]) -> str | None:
    """Why a checkpoint holds something of the removed clients, or None if it holds nothing."""
    touched = first_round_using(bundle["ledger"], ids, clients)
    if touched is not None:
        return f"its ledger names them in round {touched}"
    topo = bundle.get("topology", {})
    for path in ("clients.local", "clients.privacy", "clients.codec"):
        held = sorted(set(topo.get(path, {})) & clients)
        if held:
            return f"its {path} holds {held[:3]}"
    return None


# ---------------------------------------------------------------- plan and replay


def plan_replay(
    run_dir: Path, cfg: RunConfig, ids: Sequence[str], clients: frozenset[str]
) -> ReplayPlan:
    """Pick the checkpoint to replay from (see the module docstring)."""
    ledger_csv = run_dir / "ledger.csv"
    if not ledger_csv.is_file():
        raise CheckpointError(
            f"'{run_dir}' has no ledger.csv: unlearn needs a finished run folder "
            "(finish it with python -m hierfed run --resume RUN_DIR)"
        )
    saved = _checkpoint_rounds(run_dir)
    if not saved:
        raise CheckpointError(
            f"'{run_dir}' has no checkpoints ({run_dir / CKPT_DIR} is missing or empty): exact "
            "unlearning verifies the replay point against a checkpoint; rerun with "
            "checkpoint.every >= 1"
        )
    first = first_round_using(CommLedger.load(ledger_csv), ids, clients)
    last_clean = cfg.rounds if first is None else first - 1
    if cfg.topology.name == "gossip":
        last_clean = 0  # the global mean changes from round 1 (module docstring)
    skipped: list[str] = []
    for rnd in sorted((r for r in saved if 0 < r <= last_clean), reverse=True):
        why = _clean(_load_checkpoint(saved[rnd]), ids, clients)
        if why is None:
            return ReplayPlan(tuple(ids), clients, first, rnd, saved[rnd], cfg.rounds)
        skipped.append(f"round {rnd}: {why}")
        log.warning("checkpoint of round %d not reused: %s", rnd, why)
    return ReplayPlan(tuple(ids), clients, first, 0, None, cfg.rounds, tuple(skipped))


def unlearn_exact(
    run_dir: str | Path,
    *,
    out: str | Path,
    clients: Sequence[str] = (),
    nodes: Sequence[str] = (),
    overrides: Sequence[str] = (),
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
) -> ReplayResult:
    """Write ``out``: the run of ``run_dir`` with ``clients`` and ``nodes`` (tier-node ids)
    excluded from the start, replayed from the newest checkpoint that predates their data.

    ``overrides`` may change only what the config fingerprint ignores (``runtime.*``,
    ``checkpoint.*``). ``run_dir`` is never written; ``out`` must not exist or be empty.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise HierfedError(f"'{run_dir}' is not a run folder: it has no config.yaml")
    if out.resolve() == run_dir.resolve():
        raise ConfigError("--out", str(out), "must be a new folder; the original run is kept")
    if out.exists() and any(out.iterdir()):
        raise ConfigError("--out", str(out), "exists and is not empty; give a new folder")
    cfg = load_config(run_dir / "config.yaml", list(overrides))
    if _fingerprint(cfg) != _fingerprint(load_config(run_dir / "config.yaml")):
        raise ConfigError(
            "overrides", list(overrides), "may change only runtime.* and checkpoint.* settings"
        )
    fed = build_federation(cfg)
    new, ids, removed = exclusion_config(cfg, fed, clients=clients, nodes=nodes, out=out)
    plan = plan_replay(run_dir, cfg, ids, removed)
    sha = None
    t0 = time.perf_counter()
    if plan.checkpoint is not None:
        bundle = _load_checkpoint(plan.checkpoint)
        sha = _folder_sha256(plan.checkpoint)
        # the one deliberate step: the checkpoint is the excluded run's too (checked above), so
        # it is written into the new folder under the new config's fingerprint
        write_checkpoint(
            out, plan.start_round, {**bundle, "config": _fingerprint(new)}, new.checkpoint.keep
        )
        result = run(new, resume=True, on_event=on_event)
    else:
        result = run(new, on_event=on_event)
    wall = time.perf_counter() - t0
    return ReplayResult(plan, new, result, wall, sha)


def original_wall_s(run_dir: Path) -> float | None:
    """The original run's measured wall time (its summary.json ``total_s``), if recorded."""
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["total_s"])
    except (OSError, KeyError, ValueError, TypeError):
        return None
