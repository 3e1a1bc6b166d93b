"""Topology contract: who sends what to whom each round.

A topology is a class registered under a name, by entry point (group ``hierfed.topologies``,
how a third-party package adds one; see examples/hierfed-plugin-example) or with
``TOPOLOGIES.add`` / ``TOPOLOGIES.register``. ``simulation.run`` drives it::

    topo = TopologyClass(cfg=cfg, federation=fed, spec=spec)  # build the node graph; reject bad
                                                              # config here (ConfigError), before work
    topo.init(initial_state)                       # every component's starting values
    for rnd in 1..cfg.rounds:
        stats = topo.run_round(rnd, runtime, ledger)   # -> hierfed.tree.RoundStats
        topo.round_metrics()                       # extra per-round metrics for metrics.jsonl
    topo.global_state()                            # State evaluated as "the global model"
    topo.personalized_state(client_id)             # State a client would deploy

What a topology may do in ``run_round``:

* call only the Runtime interface: ``put`` (share states once), ``train`` (TrainJobs: clients
  train on the workers and return pre-weighted Updates), ``merge`` (MergeTasks: validate,
  aggregate, server step on the workers), ``mix`` / ``average`` (gossip mixing on the
  workers) and ``evaluate``; it holds no tensor math and makes no ``ray.*`` calls;
* draw randomness only from ``hierfed.seeding`` keyed by (seed, round, node, purpose);
* ask ``hierfed.clock.Clock`` how long transfers and training take (simulated time);
* record every transfer in the CommLedger (``direction`` up, down or peer).

What it returns: a ``RoundStats`` with ``participants``, ``failures`` (client, cause),
``rejections``, the training loss sums, ``dropped`` and ``late`` clients and
``sim_time_s`` (the round's simulated wall-clock time). ``round_metrics`` may add any
JSON-able numbers (gossip adds ``consensus_distance`` and per-node quality).

A tree topology only says which path each client takes to the root; ``TreeTopology``'s
engine does the rest. A runnable example, registering and running a plug-in topology::

    >>> from hierfed.config import load_config
    >>> from hierfed.registry import TOPOLOGIES
    >>> from hierfed.simulation import run
    >>> class Flat(TreeTopology):
    ...     name = "doc-flat"
    ...     def tree(self, federation):
    ...         root, leaf = federation.tier_names[0], federation.tier_names[-1]
    ...         return {c.id: (root, c.id) for c in federation.clients}, (root, leaf)
    >>> TOPOLOGIES.add("doc-flat", Flat)
    >>> cfg = load_config(None, ["runtime.name=local", "rounds=1", "data.num_institutions=2",
    ...     "data.students_per_institution=2", "data.essay_only_institutions=0", "model.d_model=16",
    ...     "model.num_layers=1", "model.num_heads=2", "eval.personalized=false"], topology="doc-flat")
    >>> result = run(cfg, write=False)
    >>> sorted(result.ledger.by_edge()), result.metrics[-1]["participants"]
    (['global->student', 'student->global'], 4)

A topology that is not a tree (like ``gossip``) subclasses ``Topology`` and implements the
four abstract methods itself.
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

    #: dotted attribute paths holding everything carried from one round to the next (node
    #: states, optimizer and aggregator states, local components, accountants): what a
    #: checkpoint saves and a resume restores. Keep them to tensors, numbers, strings,
    #: containers and hierfed dataclasses (see hierfed.checkpoint.pack).
    carried: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        """The carried state, by attribute path (not copied: pack it before mutating)."""
        out = {}
        for path in self.carried:
            obj: Any = self
            for part in path.split("."):
                obj = getattr(obj, part)
            out[path] = obj
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; every carried path must be present."""
        missing = set(self.carried) - set(state)
        if missing:
            from hierfed.errors import CheckpointError

            raise CheckpointError(
                f"checkpoint lacks topology state {sorted(missing)}; it was written by another topology or version"
            )
        for path in self.carried:
            *parents, leaf = path.split(".")
            obj: Any = self
            for part in parents:
                obj = getattr(obj, part)
            setattr(obj, leaf, state[path])

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
        self.engine = TreeEngine(
            cfg=cfg, federation=federation, spec=tree_spec, paths=paths, tier_names=tiers
        )

    @abstractmethod
    def tree(self, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        """Client id -> path (root first, client last), and the tier names of the tree."""

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self._tiers

    carried = (
        "engine.states",
        "engine.local",
        "engine.privacy",
        "engine.agg_states",
        "engine.opt_states",
    )

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
