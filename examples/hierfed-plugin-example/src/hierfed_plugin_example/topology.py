"""``example-star``: a third-party topology reusing hierfed's tree engine.

A tree topology only says which path each client takes to the root; the engine does the
sampling, broadcasts, training on the workers, merges and ledger records. This one is a
star in which the root tier is called ``hub`` — configure it with ``topology.tiers.hub.*``.
"""

from __future__ import annotations

from hierfed.data.federation import Federation
from hierfed.engine.tree import TreeTopology


class ExampleStar(TreeTopology):
    """Every client reports straight to one hub."""

    name = "example-star"

    @classmethod
    def tree(cls, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        leaf = federation.tier_names[-1]
        return {c.id: ("hub", c.id) for c in federation.clients}, ("hub", leaf)
