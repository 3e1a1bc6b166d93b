"""``hierarchical``: the tree the clients' tier paths define, of any depth.

Default data gives student -> institution -> global. Each aggregating tier takes its own
aggregator, participation fraction, local rounds and server optimizer from
``topology.tiers.<tier name>`` (e.g. ``topology.tiers.institution.local_rounds=2``).
"""

from __future__ import annotations

from hierfed.data.federation import Federation
from hierfed.engine.tree import TreeTopology


class HierarchicalTopology(TreeTopology):
    name = "hierarchical"

    @classmethod
    def tree(cls, federation: Federation) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
        return {c.id: c.path for c in federation.clients}, federation.tier_names
