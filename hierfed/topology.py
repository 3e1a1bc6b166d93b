"""Topology contract: who sends what to whom each round.

A topology is registered by entry point (group ``hierfed.topologies``) or with
``TOPOLOGIES.register``. It is built from the run config, the federation and the model spec,
and runs one round at a time on a Runtime. It may call only the Runtime interface
(``put``, ``train``, ``merge``, ``evaluate``) and record transfers in the CommLedger; it
holds no tensor math and makes no ``ray.*`` calls.

Contract::

    topo = TopologyClass(cfg=cfg, federation=fed, spec=spec)
    topo.init(initial_state)                       # every component's starting values
    stats = topo.run_round(rnd, runtime, ledger)   # -> RoundStats (participants, failures, ...)
    topo.global_state()                            # State evaluated as "the global model"
    topo.personalized_state(client_id)             # State a client would deploy
    topo.edges()                                   # tier edges it moves bytes on
    topo.round_metrics()                           # extra per-round metrics (may be empty)

Example (a minimal third-party topology reusing the tree engine)::

    from hierfed.topology import TreeTopology
    class TwoLevel(TreeTopology):
        def tree(self, federation):
            return {c.id: ("global", c.id) for c in federation.clients}, ("global", "client")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from hierfed.config import RunConfig
from hierfed.data.federation import Federation
from hierfed.ledger import CommLedger
from hierfed.model.spec import ModelSpec
from hierfed.runtime.base import Runtime
from hierfed.tree import RoundStats, TreeEngine
from hierfed.update import State


class Topology(ABC):
    name: str = "abstract"

    def __init__(self, *, cfg: RunConfig, federation: Federation, spec: ModelSpec) -> None:
        self.cfg, self.federation, self.spec = cfg, federation, spec

    @abstractmethod
    def init(self, initial: State) -> None: ...

    @abstractmethod
    def run_round(self, rnd: int, runtime: Runtime, ledger: CommLedger) -> RoundStats: ...

    @abstractmethod
    def global_state(self) -> State: ...

    @abstractmethod
    def personalized_state(self, client_id: str) -> State: ...

    def round_metrics(self) -> dict[str, Any]:
        return {}

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self.federation.tier_names


class TreeTopology(Topology):
    """A topology that is a tree of aggregating tiers; subclasses say how to build the tree."""

    def __init__(self, *, cfg: RunConfig, federation: Federation, spec: ModelSpec) -> None:
        super().__init__(cfg=cfg, federation=federation, spec=spec)
        paths, tiers = self.tree(federation)
        self._tiers = tiers
        tree_spec = spec if tiers == federation.tier_names else _respec(spec, tiers)
        self.engine = TreeEngine(cfg=cfg, federation=federation, spec=tree_spec, paths=paths, tier_names=tiers)

    @abstractmethod
    def tree(self, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        """Client id -> path (root first, client last), and the tier names of the tree."""

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self._tiers

    def init(self, initial: State) -> None:
        self.engine.init(initial)

    def run_round(self, rnd: int, runtime: Runtime, ledger: CommLedger) -> RoundStats:
        return self.engine.run_round(rnd, runtime, ledger)

    def global_state(self) -> State:
        return self.engine.states[self.engine.root]

    def personalized_state(self, client_id: str) -> State:
        return self.engine.personalized_state(client_id)


def _respec(spec: ModelSpec, tiers: tuple[str, ...]) -> ModelSpec:
    """The spec for a tree with other tiers: tier scopes that the tree lacks fall back to
    the nearest kept tier above them (``local`` and ``global`` keep their meaning)."""
    from dataclasses import replace

    comps = {}
    for name, c in spec.components.items():
        scope = c.scope
        if scope not in ("global", "local") and scope not in tiers:
            keep = [t for t in spec.tier_names[: spec.tier_names.index(scope)] if t in tiers]
            scope = keep[-1] if keep and keep[-1] != tiers[0] else "global"
        comps[name] = replace(c, scope=scope)
    return replace(spec, components=comps, tier_names=tiers)
