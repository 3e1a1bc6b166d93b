"""An institution's side of a deployment: its whole subtree for one round, on its own machine.

A SuperNode's ClientApp (``hierfed.deploy.flower_app``) calls ``InstitutionSite.round`` with
what the server broadcast; the site runs the institution's students on its own runtime
(``runtime.name: local``, or its own Ray session — never one spanning institutions) and returns
the institution's pre-weighted Update as the simulated institution would send it up. Its
state (tier-scoped components, aggregator and optimizer states, its students' DP accountants
and local components) and the ledger of its inner edges stay in its work folder, one folder
per Flower run. Raw data and student-level updates never leave this process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from hierfed.checkpoint import atomic_write_text, load_bundle, save_bundle
from hierfed.config import RunConfig, load_config, to_yaml, validate_config
from hierfed.data.federation import Federation
from hierfed.engine import ChannelSet, RoundContext
from hierfed.engine.subtree import SubtreeEngine, SubtreeReply, with_engine
from hierfed.errors import HierfedError
from hierfed.ledger import CommLedger
from hierfed.model.spec import ModelSpec
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.base import Runtime, make_runtime
from hierfed.runtime.worker import WorkerSetup
from hierfed.update import State

log = logging.getLogger(__name__)


class SiteMismatch(HierfedError):
    """A SuperNode's institution or data does not match the server's configuration."""


def institution_profile(fed: Federation, institution: str) -> dict[str, int]:
    """Client id -> training rows, for the clients under ``institution``: what the server
    expects a SuperNode to hold (ids and counts only; no data)."""
    return {
        c.id: int(c.num_train)
        for c in sorted(fed.clients, key=lambda c: c.id)
        if len(c.path) > 2 and "/".join(c.path[:2]) == institution
    }


def institutions(fed: Federation) -> list[str]:
    """The root's children (institutions with the default data) by node id, sorted."""
    return sorted({"/".join(c.path[:2]) for c in fed.clients if len(c.path) > 2})


def site_config(config_yaml: str, data_yaml: str | None, workdir: Path) -> RunConfig:
    """The server's config with this site's own ``data`` section (its data path / options)
    laid over it; written into the work folder so omegaconf reads it as a file."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "server-config.yaml"
    atomic_write_text(path, config_yaml)
    cfg = load_config(path, validate=False)
    if data_yaml:
        mine = load_config(data_yaml, validate=False)
        cfg = replace(cfg, data=mine.data)
    validate_config(cfg)  # also imports the built-in and configured plug-ins
    return cfg


# the in-process runtime of the last config, kept while this process lives: a ClientApp
# process usually serves one message, but in-process sites (tests, benchmarks) serve many, and
# a worker holds no state between rounds (the simulation reuses its workers the same way)
_RUNTIMES: dict[str, tuple[Runtime, ModelSpec, State]] = {}


def _runtime(cfg: RunConfig, fed: Federation) -> tuple[Runtime, ModelSpec, State]:
    key = to_yaml(replace(cfg, out=None))
    if key not in _RUNTIMES:
        for old, _, _ in _RUNTIMES.values():
            old.shutdown()
        _RUNTIMES.clear()
        rt = make_runtime(cfg.runtime)
        rt.start(WorkerSetup(cfg, fed))
        spec, initial = rt.model_info()
        _RUNTIMES[key] = (rt, spec, initial)
    return _RUNTIMES[key]


class InstitutionSite:
    """One institution's subtree: built on the first round of a run, reloaded from its work
    folder on later rounds (a ClientApp process may live for one message only)."""

    def __init__(self, *, institution: str, workdir: Path, data_yaml: str | None = None) -> None:
        self.institution = institution
        self.workdir = Path(workdir)
        self.data_yaml = data_yaml

    def check(self, cfg: RunConfig, fed: Federation, expected: Mapping[str, int]) -> None:
        """Refuse to train when this site's institution or data is not what the server expects."""
        known = institutions(fed)
        if self.institution not in known:
            raise SiteMismatch(
                f"SuperNode institution '{self.institution}' is not in the config's federation "
                f"(known: {', '.join(known)}): start the SuperNode with "
                "--node-config 'institution=\"<one of them>\"'"
            )
        mine = institution_profile(fed, self.institution)
        if mine != dict(expected):
            diff = sorted(set(mine.items()) ^ set(expected.items()))[:3]
            raise SiteMismatch(
                f"SuperNode data for '{self.institution}' does not match the server's config "
                f"({len(mine)} clients / {sum(mine.values())} rows here, {len(expected)} / "
                f"{sum(expected.values())} expected; first differences {diff}): give the "
                "SuperNode the data section the server's config describes (node-config 'data')"
            )

    def round(
        self,
        *,
        run_id: str,
        config_yaml: str,
        rnd: int,
        key: tuple,
        above: State,
        expected: Mapping[str, int],
    ) -> tuple[SubtreeReply, dict[str, int]]:
        """One parent-round of this institution; returns its reply and the bytes its inner
        edges moved this round (by edge)."""
        folder = self.workdir / f"run-{run_id}"
        cfg = site_config(config_yaml, self.data_yaml, folder)
        from hierfed.simulation import build_federation

        fed = build_federation(cfg)
        self.check(cfg, fed, expected)
        topo_cls = TOPOLOGIES.get(cfg.topology.name)
        rt, spec, initial = _runtime(cfg, fed)
        try:
            topo = with_engine(topo_cls(cfg=cfg, federation=fed, spec=spec), SubtreeEngine)
            topo.init(initial)
            done = self._restore(folder, topo, rnd)
            ledger = CommLedger.load(folder / "ledger.csv") if done else CommLedger()
            ctx = RoundContext(
                round=rnd,
                runtime=rt,
                channels=ChannelSet(cfg, fed, ledger),
                clients=topo.clients,
                key=tuple(key),
            )
            reply = topo.engine.run_subtree(self.institution, above, ctx)
            save_bundle(folder, "state", {"round": rnd, "topology": topo.state_dict()})
            ledger.save(folder / "ledger.csv")
            atomic_write_text(folder / "DONE", f"{rnd}\n")
        finally:
            if rt.name != "local":  # a local runtime is kept for the next round (below)
                _RUNTIMES.clear()
                rt.shutdown()
        return reply, ledger.by_edge(rnd)

    def _restore(self, folder: Path, topo: Any, rnd: int) -> int:
        """Load the state this site kept after round ``rnd - 1`` (none before round 1);
        returns the last round done."""
        done_file = folder / "DONE"
        done = int(done_file.read_text()) if done_file.exists() else 0
        if done != rnd - 1:
            raise SiteMismatch(
                f"SuperNode '{self.institution}' has done round {done} of this run and was "
                f"asked for round {rnd}: its work folder {folder} is out of step; restart the "
                "run (a SuperNode cannot rejoin a run it missed a round of)"
            )
        if done:
            bundle = load_bundle(folder, "state")
            topo.load_state_dict(bundle["topology"])
        return done
