"""run(cfg) -> RunResult: builds everything, runs the rounds, evaluates, writes the run folder.

The library never prints: progress goes to the optional ``on_event`` callback (the CLI's
reporter draws it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from hierfed.checkpoint import atomic_write_text, nulled, save_state
from hierfed.config import (
    RunConfig,
    check_federation,
    check_tier_names,
    to_yaml,
    validate_config,
)
from hierfed.continual.record import Recorder, write_continual
from hierfed.continual.schedule import continual_on
from hierfed.data.federation import Federation
from hierfed.engine import ChannelSet, RoundContext, RoundStats, require_no_failures
from hierfed.health import check_round
from hierfed.ledger import CommLedger
from hierfed.model.spec import ModelSpec
from hierfed.privacy.accountant import gossip_uncovered, privacy_metrics
from hierfed.registry import DATASETS, TOPOLOGIES
from hierfed.resume import config_fingerprint, fault_point, read_latest, write_checkpoint
from hierfed.rundir import claim_run_dir, unique_default
from hierfed.runtime.base import Runtime, make_runtime
from hierfed.runtime.jobs import EvalJob
from hierfed.runtime.worker import WorkerSetup
from hierfed.topology import Topology
from hierfed.tracking import with_tracking
from hierfed.unlearning.exclusion import excluded_clients
from hierfed.update import State

log = logging.getLogger(__name__)
Event = Callable[[str, dict[str, Any]], None]


@dataclass
class RunResult:
    cfg: RunConfig
    out_dir: Path | None
    metrics: list[dict[str, Any]]
    ledger: CommLedger
    final_state: State
    personalized: dict[str, dict[str, float]] = field(default_factory=dict)
    federation_summary: dict[str, Any] = field(default_factory=dict)

    @property
    def final_metrics(self) -> dict[str, float]:
        for rec in reversed(self.metrics):
            if rec.get("global"):
                return dict(rec["global"])
        return {}

    @property
    def initial_metrics(self) -> dict[str, float]:
        return dict(self.metrics[0].get("global", {})) if self.metrics else {}


@dataclass
class History:
    """What a run carries from round to round besides the topology: metrics, the ledger, the
    simulated clock's total and the latest DP report per client (checkpointed together)."""

    ledger: CommLedger = field(default_factory=CommLedger)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    start_round: int = 1
    sim_total: float = 0.0
    dp_seen: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def restore(cls, topo: Topology, ck: dict[str, Any] | None) -> History:
        """A fresh history, or the checkpoint's (and the topology's carried state from it)."""
        if ck is None:
            return cls()
        topo.load_state_dict(ck["topology"])
        return cls(
            ledger=ck["ledger"],
            metrics=list(ck["metrics"]),
            start_round=int(ck["round"]) + 1,
            sim_total=float(ck["sim_total"]),
            dp_seen=dict(ck["dp_seen"]),
        )

    def checkpoint(self, out_dir: Path, rnd: int, cfg: RunConfig, topo: Topology) -> None:
        write_checkpoint(
            out_dir,
            rnd,
            {
                "round": rnd,
                "config": _fingerprint(cfg),
                "topology": topo.state_dict(),
                "metrics": self.metrics,
                "ledger": self.ledger,
                "sim_total": self.sim_total,
                "dp_seen": self.dp_seen,
            },
            cfg.checkpoint.keep,
        )


def _build_topology(
    cfg: RunConfig,
    fed: Federation,
    rt: Runtime,
    topo_cls: type[Topology],
    prepare: Callable[[Topology], None] | None = None,
) -> tuple[ModelSpec, Topology]:
    """The run's topology on the model worker 0 built: the driver takes the spec and initial
    state from there and never loads a backbone or peft itself (seconds of start-up each).
    ``prepare`` sees the topology before its ``init`` (a deployment rewires its top edge)."""
    spec, initial = rt.model_info()
    topo = topo_cls(cfg=cfg, federation=fed, spec=spec)
    if prepare is not None:
        prepare(topo)
    topo.init(initial)
    check_tier_names(cfg, topo.tier_names)  # before any round: no setting silently unused
    for edge, why in gossip_uncovered(cfg, topo.tier_names).items():
        log.warning("client-level DP into tier '%s': %s", edge, why)
    return spec, topo


def _round_record(
    cfg: RunConfig,
    rnd: int,
    stats: RoundStats,
    topo: Topology,
    rt: Runtime,
    fed: Federation,
    hist: History,
    t_round: float,
) -> dict[str, Any]:
    """The round's line in metrics.jsonl (evaluating the global model when it is due)."""
    by_edge = hist.ledger.by_edge(rnd)
    rec: dict[str, Any] = {
        "round": rnd,
        "train_loss": stats.train_loss,
        "participants": stats.participants,
        "rejected": len(stats.rejections),
        "failed": len(stats.failures),
        "bytes": by_edge,
        "bytes_total": sum(by_edge.values()),
        "sim_time_s": stats.sim_time_s,  # simulated wall clock (hierfed/clock.py)
        "sim_time_total_s": hist.sim_total + stats.sim_time_s,
        "dropped": len(stats.dropped),
        "late": len(stats.late),
        **topo.round_metrics(),
    }
    if rnd % cfg.eval.every == 0 or rnd == cfg.rounds:
        rec["global"] = evaluate_global(rt, topo.global_state(), fed)
    rec["wall_s"] = time.perf_counter() - t_round
    if stats.rejections:
        rec["rejections"] = [f"{s}: {r}" for s, r in stats.rejections[:20]]
    rec.update(privacy_metrics(cfg, topo.tier_names, rnd, stats.privacy, hist.dp_seen))
    if stats.failures:
        rec["failures"] = [f"{c}: {why}" for c, why in stats.failures[:20]]
    if cfg.eval.contributions:  # leave-one-out influence per sender (hierfed/explain)
        rec["contributions"] = dict(sorted(stats.contributions.items()))
    events = rt.drain_events()
    if events:
        rec["worker_failures"] = events
    return rec


def build_federation(cfg: RunConfig) -> Federation:
    fed = DATASETS.get(cfg.data.name)(cfg.data, cfg.seed)
    if cfg.data.max_clients and len(fed.clients) > cfg.data.max_clients:
        keep = {c.id for c in fed.clients[: cfg.data.max_clients]}
        fed = replace(
            fed,
            clients=[c for c in fed.clients if c.id in keep],
            train={k: v for k, v in fed.train.items() if k in keep},
            test={k: v for k, v in fed.test.items() if k in keep},
        )
    return fed


def evaluate_global(runtime: Runtime, state: State, fed: Federation) -> dict[str, float]:
    jobs = [EvalJob("global", (t,), "global") for t in sorted(fed.tasks)]
    out: dict[str, float] = {}
    for _, res in runtime.evaluate(jobs, {"global": state}):
        for t, (metric, _) in res.items():
            out[t] = metric
    return out


def evaluate_personalized(
    runtime: Runtime, topo: Topology, fed: Federation
) -> dict[str, dict[str, float]]:
    """Each client's personalized model on its own held-out rows, per task."""
    states = {c.id: topo.personalized_state(c.id) for c in fed.clients if c.num_test > 0}
    jobs = [EvalJob(cid, fed.by_id[cid].tasks, cid, split="client-test") for cid in sorted(states)]
    return {
        name: {t: m for t, (m, _) in res.items()} for name, res in runtime.evaluate(jobs, states)
    }


def default_out_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.topology.name}"


def run(
    cfg: RunConfig,
    *,
    runtime: Runtime | None = None,
    on_event: Event | None = None,
    write: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    prepare: Callable[[Topology], None] | None = None,
) -> RunResult:
    """Run a whole federation. ``runtime`` may be passed in (e.g. a test's shared one).

    With ``resume=True`` the run continues from the newest checkpoint in ``cfg.out`` and ends
    bit-identical to an uninterrupted run with the same config (CPU). The run folder is made
    and locked first (hierfed.rundir); one that holds anything is refused unless ``resume``
    or ``overwrite``. ``prepare``: see ``_build_topology`` (hierfed.deploy's server)."""
    validate_config(cfg)
    out_dir = Path(cfg.out) if cfg.out else unique_default(default_out_dir(cfg))
    claim = (  # a run that writes nothing claims no folder
        claim_run_dir(out_dir, resume=resume, overwrite=overwrite)
        if write or resume
        else contextlib.nullcontext()
    )
    with claim:
        return _run(
            cfg,
            out_dir,
            runtime=runtime,
            on_event=on_event,
            write=write,
            resume=resume,
            prepare=prepare,
        )


def _run(
    cfg: RunConfig,
    out_dir: Path,
    *,
    runtime: Runtime | None,
    on_event: Event | None,
    write: bool,
    resume: bool,
    prepare: Callable[[Topology], None] | None = None,
) -> RunResult:
    emit = on_event or (lambda kind, data: None)
    t0 = time.perf_counter()
    fed = build_federation(cfg)
    check_federation(cfg, fed)  # tier names, token budget: before any worker starts
    emit = with_tracking(cfg, out_dir if write else None, emit)  # logging.tensorboard
    ck: dict[str, Any] | None = None
    if resume:  # checked before any worker starts
        ck = read_latest(out_dir, fingerprint=_fingerprint(cfg), rounds=cfg.rounds)
    topo_cls = TOPOLOGIES.get(cfg.topology.name)
    topo_cls.check(cfg, fed)  # every topology and tier setting, before any worker starts
    excluded_clients(cfg, fed)  # `exclude` names known clients or tier nodes (unlearning)
    own_runtime = runtime is None
    rt = runtime or make_runtime(cfg.runtime)
    summary = fed.summary()
    try:
        if own_runtime:
            emit("launch", {"runtime": rt.name, "federation": summary})
            rt.start(WorkerSetup(cfg, fed))
        spec, topo = _build_topology(cfg, fed, rt, topo_cls, prepare)
        if write:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        hist = History.restore(topo, ck)
        ledger, metrics = hist.ledger, hist.metrics
        emit(
            "start",
            {
                "federation": summary,
                "trainable": spec.trainable_numel(),
                "backbone": spec.backbone_numel,
                "tiers": list(topo.tier_names),
            },
        )
        startup_s = time.perf_counter() - t0
        if hist.start_round == 1:
            metrics.append(
                {"round": 0, "global": evaluate_global(rt, topo.global_state(), fed), "bytes": {}}
            )
            metrics[0]["wall_s"] = 0.0
            emit("round", metrics[0])
        else:
            emit("resume", {"round": hist.start_round - 1})
        channels = ChannelSet(cfg, fed, ledger)
        cl = Recorder.make(cfg, fed)  # continual runs: stage-end evaluations (hierfed/continual)
        for rnd in range(hist.start_round, cfg.rounds + 1):
            t_round = time.perf_counter()
            snap = cl.before_round(rnd, topo) if cl else None
            stats = topo.run_round(
                RoundContext(round=rnd, runtime=rt, channels=channels, clients=topo.clients)
            )
            # a failed client fails the run, unless failures are tolerated (then quorums decide)
            require_no_failures(stats, rnd, tolerate=cfg.runtime.on_client_failure == "drop")
            rec = _round_record(cfg, rnd, stats, topo, rt, fed, hist, t_round)
            if cl and (stage := cl.after_round(rnd, topo, rt, snap)) is not None:
                rec["continual"] = stage
            metrics.append(rec)
            emit("round", rec)
            check_round(
                rnd,
                global_state=topo.global_state(),
                participants=stats.participants,
                rejections=stats.rejections,
                client_ids=fed.by_id,
            )
            hist.sim_total = rec["sim_time_total_s"]
            every = cfg.checkpoint.every
            if write and ((every and rnd % every == 0) or rnd == cfg.rounds):
                hist.checkpoint(out_dir, rnd, cfg, topo)
            fault_point("after-round", rnd)
        personalized = evaluate_personalized(rt, topo, fed) if cfg.eval.personalized else {}
    finally:
        if own_runtime:
            rt.shutdown()
    final = topo.global_state()
    result = RunResult(
        cfg, out_dir if write else None, metrics, ledger, final, personalized, summary
    )
    if write:
        _write_outputs(result, startup_s=startup_s, total_s=time.perf_counter() - t0, fed=fed)
    emit("end", {"result": result})
    return result


def _fingerprint(cfg: RunConfig) -> str:
    """What a resumed run must share with the original: everything that affects results
    (not the run folder, the runtime, the checkpoint cadence or the tracking)."""
    from hierfed.config import CheckpointConfig, DeploymentConfig, LoggingConfig, RuntimeConfig

    return config_fingerprint(
        to_yaml(
            replace(
                cfg,
                out=None,
                runtime=RuntimeConfig(),
                checkpoint=CheckpointConfig(),
                logging=LoggingConfig(),
                deployment=DeploymentConfig(),
            )
        )
    )


def personalized_means(personalized: dict[str, dict[str, float]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for res in personalized.values():
        for t, m in res.items():
            acc.setdefault(t, []).append(m)
    return {t: sum(v) / len(v) for t, v in sorted(acc.items())}


def _clean(obj: Any) -> Any:
    return nulled(obj, null=math.isnan)  # NaN only: an infinite metric is written as it is


def _write_outputs(
    result: RunResult, *, startup_s: float, total_s: float, fed: Federation | None = None
) -> None:
    out = result.out_dir
    assert out is not None
    lines = "".join(json.dumps(_clean(rec), sort_keys=True) + "\n" for rec in result.metrics)
    atomic_write_text(out / "metrics.jsonl", lines)
    result.ledger.save(out / "ledger.csv")
    save_state(
        out / "final_state",
        result.final_state,
        {"rounds": result.cfg.rounds, "seed": result.cfg.seed},
    )
    summary = {
        "federation": result.federation_summary,
        "initial": result.initial_metrics,
        "final": result.final_metrics,
        "personalized_mean": personalized_means(result.personalized),
        "bytes_by_edge": result.ledger.by_edge(),
        "bytes_by_component": result.ledger.by_component(),
        "bytes_total": result.ledger.total(),
        "startup_s": startup_s,
        "total_s": total_s,
    }
    if result.cfg.eval.contributions:  # leave-one-out influence per sender, over the run
        from hierfed.explain.contribution import contribution_totals

        summary["contributions"] = contribution_totals(result.metrics)
    if fed is not None and result.cfg.eval.equity:  # per institution and group (issue 18)
        from hierfed.explain.equity import equity_summary

        summary["equity"] = equity_summary(
            result.cfg, fed, result.final_state, result.ledger, result.personalized
        )
    if fed is not None and continual_on(result.cfg):  # accuracy matrices, forgetting
        summary["continual"] = write_continual(out, result.cfg, fed, result.metrics)
    atomic_write_text(out / "summary.json", json.dumps(_clean(summary), indent=1, sort_keys=True))
    if result.personalized:
        atomic_write_text(
            out / "personalized.json",
            json.dumps(_clean(result.personalized), indent=1, sort_keys=True),
        )
