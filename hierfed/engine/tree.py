"""TreeTopology: a topology that is a tree of aggregating tiers, run by the TreeEngine.

Subclasses (``star``, ``hierarchical``, a plug-in's) only say which path each client takes to
the root, in a classmethod ``tree``, so the tree can be checked before any worker starts.
"""

from __future__ import annotations

from abc import abstractmethod

from hierfed.config import RunConfig, check_tier_names
from hierfed.data.federation import Federation
from hierfed.engine.checks import check_tree
from hierfed.engine.context import RoundContext
from hierfed.engine.graph import TreeGraph
from hierfed.engine.stats import RoundStats
from hierfed.engine.walk import TreeEngine
from hierfed.model.spec import ModelSpec
from hierfed.topology import Topology
from hierfed.update import State


class TreeTopology(Topology):
    """A topology that is a tree of aggregating tiers; subclasses say how to build the tree."""

    def __init__(self, *, cfg: RunConfig, federation: Federation, spec: ModelSpec) -> None:
        super().__init__(cfg=cfg, federation=federation, spec=spec)
        paths, tiers = self.tree(federation)
        self._tiers = tiers
        tree_spec = spec if tiers == federation.tier_names else _respec(spec, tiers)
        self.engine = TreeEngine(
            cfg=cfg,
            federation=federation,
            spec=tree_spec,
            graph=TreeGraph(federation, paths, tiers),
            clients=self.clients,
        )

    @classmethod
    @abstractmethod
    def tree(cls, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        """Client id -> path (root first, client last), and the tier names of the tree."""

    @classmethod
    def check(cls, cfg: RunConfig, federation: Federation) -> None:
        paths, tiers = cls.tree(federation)
        check_tier_names(cfg, tiers)  # no setting for a tier this tree does not have
        check_tree(cfg, TreeGraph(federation, paths, tiers))

    @property
    def tier_names(self) -> tuple[str, ...]:
        return self._tiers

    @property
    def carried(self) -> tuple[str, ...]:  # type: ignore[override]
        # a continual run also carries its EWC anchors; checkpoints of other runs are unchanged
        base = ("engine.states", "engine.agg_states", "engine.opt_states")
        return (*base, "engine.anchors") if self.engine.continual is not None else base

    def init(self, initial: State) -> None:
        self.engine.init(initial)

    def run_round(self, ctx: RoundContext) -> RoundStats:
        return self.engine.run_round(ctx)

    def global_state(self) -> State:
        return self.engine.global_state()

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
