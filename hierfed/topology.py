"""Topology contract: who sends what to whom each round.

A topology is a class registered under a name, by entry point (group ``hierfed.topologies``,
how a third-party package adds one; see examples/hierfed-plugin-example) or with
``TOPOLOGIES.add`` / ``TOPOLOGIES.register``. ``simulation.run`` drives it::

    TopologyClass.check(cfg, fed)                  # config against the federation: ConfigError
                                                   # here, before any worker starts
    topo = TopologyClass(cfg=cfg, federation=fed, spec=spec)  # build the node graph
    topo.init(initial_state)                       # every component's starting values
    channels = ChannelSet(cfg, fed, ledger)        # one Channel per edge (hierfed.engine)
    for rnd in 1..cfg.rounds:
        ctx = RoundContext(round=rnd, runtime=runtime, channels=channels, clients=topo.clients)
        stats = topo.run_round(ctx)                # -> RoundStats (ctx.stats)
        topo.round_metrics()                       # extra per-round metrics for metrics.jsonl
    topo.global_state()                            # State evaluated as "the global model"
    topo.personalized_state(client_id)             # State a client would deploy

What a topology may do in ``run_round``:

* call only the Runtime interface (``ctx.runtime``): ``put`` (share states once), ``train``
  (TrainJobs: clients train on the workers and return pre-weighted Updates), ``merge``
  (MergeTasks: validate, aggregate, server step on the workers), ``mix`` / ``average`` (peer
  mixing on the workers) and ``evaluate``; it holds no tensor math and makes no ``ray.*`` calls;
* draw randomness only from ``hierfed.seeding`` keyed by (seed, round, node, purpose), and
  sample members with ``hierfed.engine.sampling``;
* move everything across an edge through ``ctx.channels`` (ledger and simulated clock);
* fold every trained client's result into the round with ``ctx.stats.absorb`` (which carries
  its DP accountant and local components in ``ctx.clients``).

What it returns: ``ctx.stats``, a ``RoundStats`` with ``participants``, ``failures`` (client,
cause), ``rejections``, the training loss sums, ``dropped`` and ``late`` clients and
``sim_time_s`` (the round's simulated wall-clock time). ``round_metrics`` may add any
JSON-able numbers (gossip adds ``consensus_distance`` and per-node quality).

A tree topology subclasses ``hierfed.engine.tree.TreeTopology`` and only says which path
each client takes to the root (a classmethod ``tree``); the engine does the rest. A runnable example, registering and running a
plug-in topology::

    >>> from hierfed.config import load_config
    >>> from hierfed.engine.tree import TreeTopology
    >>> from hierfed.registry import TOPOLOGIES
    >>> from hierfed.simulation import run
    >>> class Flat(TreeTopology):
    ...     name = "doc-flat"
    ...     @classmethod
    ...     def tree(cls, federation):
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
from hierfed.engine.context import RoundContext
from hierfed.engine.stats import ClientStore, RoundStats
from hierfed.errors import CheckpointError
from hierfed.model.spec import ModelSpec
from hierfed.update import State

#: what every topology carries between rounds, whatever its own ``carried`` says
CLIENT_STATE = ("clients.local", "clients.privacy", "clients.codec")
#: carried paths a checkpoint written before them may lack (restored empty)
OPTIONAL_STATE = frozenset({"clients.codec"})


class Topology(ABC):
    name: str = "abstract"

    def __init__(self, *, cfg: RunConfig, federation: Federation, spec: ModelSpec) -> None:
        self.cfg, self.federation, self.spec = cfg, federation, spec
        self.clients = ClientStore()  # DP accountants and local components, per client

    @classmethod
    def check(cls, cfg: RunConfig, federation: Federation) -> None:
        """Check the config against the federation before any worker starts (ConfigError
        naming the key, the value and the fix). Needs no model: the run calls it first.
        A topology without settings of its own to check keeps this one."""
        return None

    @abstractmethod
    def init(self, initial: State) -> None: ...

    @abstractmethod
    def run_round(self, ctx: RoundContext) -> RoundStats: ...

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
        for path in (*CLIENT_STATE, *self.carried):
            obj: Any = self
            for part in path.split("."):
                obj = getattr(obj, part)
            out[path] = obj
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned; every carried path must be present."""
        paths = (*CLIENT_STATE, *self.carried)
        state = {**{p: {} for p in OPTIONAL_STATE}, **state}
        missing = set(paths) - set(state)
        if missing:
            raise CheckpointError(
                f"checkpoint lacks topology state {sorted(missing)}; it was written by another "
                "topology or version"
            )
        for path in paths:
            *parents, leaf = path.split(".")
            obj: Any = self
            for part in parents:
                obj = getattr(obj, part)
            setattr(obj, leaf, state[path])

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self.federation.tier_names
