"""The tree a round walks: tier nodes, their members and the weights bounding their updates.

Built from each client's path (root first, client last) and the tier names, before any
worker starts, so a malformed tree fails at once (``DataError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from hierfed.data.federation import Federation
from hierfed.errors import DataError


@dataclass
class Node:
    id: str
    level: int  # tier index: 0 = root
    tier: str
    parent: str | None
    children: list[str] = field(default_factory=list)
    max_weight: float = 0.0  # train rows below this node (bound for validation)


class TreeGraph:
    """Nodes by id, the root, the leaves (clients) and the tier names, root first."""

    def __init__(
        self,
        federation: Federation,
        paths: Mapping[str, tuple[str, ...]],
        tier_names: tuple[str, ...],
    ) -> None:
        self.tier_names = tier_names
        self.nodes: dict[str, Node] = {}
        self.leaves: set[str] = set(paths)
        profiles = federation.by_id
        for cid, path in sorted(paths.items()):
            if len(path) != len(tier_names):
                raise DataError(
                    f"client '{cid}' path {path} does not have {len(tier_names)} tiers {tier_names}"
                )
            ids = ["/".join(path[: i + 1]) for i in range(len(path) - 1)] + [cid]
            for lvl, nid in enumerate(ids):
                if nid not in self.nodes:
                    self.nodes[nid] = Node(nid, lvl, tier_names[lvl], ids[lvl - 1] if lvl else None)
                    if lvl:
                        self.nodes[ids[lvl - 1]].children.append(nid)
                self.nodes[nid].max_weight += profiles[cid].num_train
        roots = [n for n in self.nodes.values() if n.level == 0]
        if len(roots) != 1:
            raise DataError(f"the tree must have exactly one root, found {[r.id for r in roots]}")
        self.root = roots[0].id
        for n in self.nodes.values():
            n.children.sort()
            if n.level < len(tier_names) - 1 and not n.children:
                raise DataError(f"tier node '{n.id}' has no members; remove it or give it clients")

    @property
    def leaf_level(self) -> int:
        return len(self.tier_names) - 1

    def parent(self, node_id: str) -> str:
        parent = self.nodes[node_id].parent
        if parent is None:
            raise DataError(f"'{node_id}' is the root; it has no parent")
        return parent

    def ancestors(self, node_id: str) -> list[str]:
        """From the node's parent up to the root."""
        out, p = [], self.nodes[node_id].parent
        while p is not None:
            out.append(p)
            p = self.nodes[p].parent
        return out

    def inner(self) -> list[Node]:
        """Nodes with members (every tier but the leaves)."""
        return [n for n in self.nodes.values() if n.children]
