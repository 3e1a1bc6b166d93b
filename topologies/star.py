"""``star``: every client talks to the global server directly (FedAvg's topology)."""

from __future__ import annotations

from hierfed.data.federation import Federation
from hierfed.engine.tree import TreeTopology


class StarTopology(TreeTopology):
    """One tier: clients -> global. The federation's middle tiers are ignored."""

    name = "star"

    @classmethod
    def tree(cls, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        root, leaf = federation.tier_names[0], federation.tier_names[-1]
        return {c.id: (root, c.id) for c in federation.clients}, (root, leaf)
