"""Checks a tree's settings against the tree itself, before any worker starts.

``check_tree`` raises ``ConfigError`` (key, value, fix) for settings the tree would ignore or
cannot honour: options of the leaf tier that only aggregating tiers take, robust aggregators
with too few members per node-round, and peer graphs that cannot connect the members they
would join.
"""

from __future__ import annotations

from dataclasses import fields

from hierfed import mixing
from hierfed.aggregators.robust import check_fanouts
from hierfed.config import RunConfig, TierConfig
from hierfed.engine.graph import Node, TreeGraph
from hierfed.engine.sampling import sample_size
from hierfed.errors import ConfigError
from hierfed.seeding import np_rng

# what the leaf tier's settings may say: it trains and (device to device) mixes, never merges
LEAF_KEYS = frozenset({"peer_steps", "peer_graph", "local_rounds", "postprocess"})


def check_tree(cfg: RunConfig, graph: TreeGraph) -> None:
    """Every tier setting of ``cfg`` checked against ``graph``; ConfigError on the first misfit."""
    # robust rules need enough updates per node-round (e.g. Krum: n >= 2f + 3)
    check_fanouts(cfg, [(n.tier, len(n.children)) for n in graph.inner()])
    _check_leaf_tier(cfg, graph.tier_names)
    for tier in graph.tier_names[:-2]:  # their members are tier nodes, not clients
        listed = cfg.topology.tiers.get(tier)
        if listed is not None and listed.sampling == "by_resource":
            raise ConfigError(
                f"topology.tiers.{tier}.sampling",
                "by_resource",
                f"the members of the {tier} tier are tier nodes, which have no resource class; "
                f"set it on the tier whose members are clients (topology.tiers.{graph.tier_names[-2]})",
            )
    for node in graph.inner():
        _check_peer_graph(cfg, graph, node)


def _check_leaf_tier(cfg: RunConfig, tier_names: tuple[str, ...]) -> None:
    leaf, above = tier_names[-1], tier_names[-2]
    key = f"topology.tiers.{leaf}"
    listed = cfg.topology.tiers.get(leaf)
    if listed is None:
        return
    plain = TierConfig()
    for f in fields(TierConfig):
        value = getattr(listed, f.name)
        kept = f.name in LEAF_KEYS or f.name == "postprocess_options"
        if not kept and value != getattr(plain, f.name):
            raise ConfigError(
                f"{key}.{f.name}",
                value,
                f"the {leaf} tier does not aggregate, so this would be ignored; set it on "
                f"the tier above (topology.tiers.{above}.{f.name}). {key} takes only "
                "peer_steps, peer_graph, local_rounds and postprocess (device-to-device "
                "gossip, docs/topologies.md)",
            )
    if listed.peer_steps == 0:
        for name, off in (("local_rounds", 1), ("postprocess", [])):
            if getattr(listed, name) != off:
                raise ConfigError(
                    f"{key}.{name}",
                    getattr(listed, name),
                    f"only means something with device-to-device gossip: set "
                    f"{key}.peer_steps >= 1, or drop it (more local training: "
                    "train.local_epochs)",
                )


def _check_peer_graph(cfg: RunConfig, graph: TreeGraph, node: Node) -> None:
    """The members ``node`` samples must be connectable on their tier's peer graph."""
    first = node.children[0]
    leaf = first in graph.leaves
    if leaf:
        d2d = cfg.topology.leaf_peers(graph.tier_names[-1])
        steps, kind = (d2d.peer_steps, d2d.peer_graph) if d2d else (0, "")
        gkey = f"topology.tiers.{graph.tier_names[-1]}.peer_graph"
    else:
        tier = graph.nodes[first].tier
        steps, kind = cfg.tier(tier).peer_steps, cfg.tier(tier).peer_graph
        gkey = (
            f"topology.tiers.{tier}.peer_graph"
            if tier in cfg.topology.tiers
            else "topology.default.peer_graph"
        )
    m = sample_size(cfg.tier(node.tier).participation, len(node.children))
    if steps <= 0 or m < 2:
        return
    # an inner tier's graph is built over the members left after dropouts, which can be any
    # number from 2 to m; a leaf tier's over all it sampled (dropped leaves only lose links)
    dropout = cfg.tier(node.tier).dropout
    sizes = range(2, m + 1) if not leaf and dropout > 0 else (m,)
    for k in sizes:
        try:
            mixing.build_graph(
                mixing.GraphSpec(kind=kind),
                node.children[:k],
                np_rng(cfg.seed, "peer-graph-check", node.id),
            )
        except ConfigError as exc:
            left = (
                f"dropouts (topology.tiers.{node.tier}.dropout={dropout:g}) can leave "
                f"{k} of the {m} members '{node.id}' samples per node-round"
                if k < m
                else f"'{node.id}' samples {m} members per node-round"
            )
            raise ConfigError(
                gkey,
                kind,
                f"cannot connect them: {left} ({exc.fix}); use ring, torus or complete, "
                f"or change topology.tiers.{node.tier}.participation",
            ) from None
