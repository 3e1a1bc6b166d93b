"""The global server of a deployment: the simulated run loop with its top edge rewired.

``run_server(cfg, dispatch)`` is ``hierfed.simulation.run`` — same rounds, global aggregator
and server step, evaluation, checkpoints, metrics and ledger in the run folder — except that
the root's children (institutions) run their parent-rounds wherever ``dispatch`` sends them
(over Flower in ``hierfed.deploy.flower_app``; in-process in ``LocalSites``, for tests). The
server runs only the root's merge and its evaluation, in-process.

What the server cannot see is not evaluated there: personalized models and equity metrics
need the institutions' states and their clients' rows, so a deployed run turns them off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from hierfed.config import RunConfig, RuntimeConfig, to_yaml
from hierfed.data.federation import Federation
from hierfed.deploy.node import InstitutionSite, institution_profile, institutions
from hierfed.deploy.wire import reply_from_wire, reply_to_wire, state_from_bytes, state_to_bytes
from hierfed.engine.subtree import Dispatch, RemoteChildrenEngine, SubtreeReply, with_engine
from hierfed.errors import ConfigError, HierfedError
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import Event, RunResult, build_federation, run
from hierfed.topology import Topology
from hierfed.update import State

log = logging.getLogger(__name__)


def server_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` as the server runs it: without the evaluations that need institutions' data."""
    if cfg.topology.name not in ("hierarchical",):
        raise ConfigError(
            "topology.name",
            cfg.topology.name,
            "a deployment runs a tree whose root's children are institutions: use hierarchical",
        )
    if cfg.eval.personalized or cfg.eval.equity:
        log.info("deployment: personalized and equity evaluation stay at the institutions")
    return replace(cfg, eval=replace(cfg.eval, personalized=False, equity=False))


def check_deployable(fed: Federation) -> list[str]:
    """The institutions (root's children) of a federation whose tree has three tiers or more."""
    found = institutions(fed)
    if len(fed.tier_names) < 3 or not found:
        raise ConfigError(
            "data",
            fed.name,
            f"tiers {list(fed.tier_names)}: a deployment needs students under institutions "
            "under the global server (three tiers or more)",
        )
    return found


def run_server(
    cfg: RunConfig,
    dispatch: Dispatch,
    *,
    on_event: Event | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run the global tier; every institution's parent-round goes through ``dispatch``."""
    cfg = server_config(cfg)
    fed = build_federation(cfg)
    check_deployable(fed)
    rt = LocalRuntime(RuntimeConfig(name="local", num_workers=1))
    rt.start(WorkerSetup(cfg, fed))

    def prepare(topo: Topology) -> None:
        with_engine(topo, RemoteChildrenEngine)
        topo.engine.dispatch = dispatch  # type: ignore[attr-defined]

    try:
        return run(cfg, runtime=rt, on_event=on_event, overwrite=overwrite, prepare=prepare)
    finally:
        rt.shutdown()


class LocalSites:
    """A dispatch that runs every institution's site in this process, through the wire
    format (for tests and for timing the deployment's own cost without a network)."""

    def __init__(self, cfg: RunConfig, workdir: Path, run_id: str = "local") -> None:
        self.cfg, self.run_id = cfg, run_id
        self.fed = build_federation(cfg)
        self.sites = {
            inst: InstitutionSite(institution=inst, workdir=Path(workdir) / inst.replace("/", "_"))
            for inst in institutions(self.fed)
        }
        self.config_yaml = to_yaml(cfg)
        self.inner_bytes: dict[str, int] = {}

    def __call__(
        self, rnd: int, key: tuple, above: Mapping[str, State]
    ) -> dict[str, SubtreeReply | str]:
        out: dict[str, SubtreeReply | str] = {}
        for inst in sorted(above):
            try:
                reply, inner = self.sites[inst].round(
                    run_id=self.run_id,
                    config_yaml=self.config_yaml,
                    rnd=rnd,
                    key=key,
                    above=state_from_bytes(state_to_bytes(above[inst])),
                    expected=institution_profile(self.fed, inst),
                )
            except HierfedError as exc:
                out[inst] = str(exc)
                continue
            out[inst] = reply_from_wire(*reply_to_wire(reply))
            for edge, n in inner.items():
                self.inner_bytes[edge] = self.inner_bytes.get(edge, 0) + n
        return out
