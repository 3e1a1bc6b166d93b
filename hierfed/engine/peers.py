"""Peer mixing inside a tree: siblings of an inner tier, and students device to device.

Both use push-sum with carried weights (``mixing.push_sum_plan``): each member enters with
its value and weight per component and leaves with its mixed value and new weight, so the
``w``-weighted sum its parent merges is the same as without mixing, on any graph. Every new
value is computed on the workers before any is kept; every exchange goes through the tier's
peer channel (ledger edge ``<tier><-><tier>``, one record per direction and step).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hierfed import mixing
from hierfed.engine.channel import Message
from hierfed.engine.context import RoundContext
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MixTask
from hierfed.seeding import np_rng
from hierfed.update import State, state_nbytes

if TYPE_CHECKING:
    from hierfed.engine.walk import TreeEngine


def mix_siblings(
    eng: TreeEngine,
    node_ids: list[str],
    cur: dict[str, State],
    weights: dict[str, dict[str, float]],
    ctx: RoundContext,
) -> dict[str, dict[str, float]]:
    """Semi-decentralized inner tier: after a node-round, siblings (same parent) mix the
    components their parent aggregates, ``peer_steps`` times on ``peer_graph``. A member
    enters with what it merged of a component this node-round (nothing merged: it neither
    sends nor receives it). Updates ``cur`` in place; returns the new weights."""
    level = eng.nodes[node_ids[0]].level
    tier = eng.nodes[node_ids[0]].tier
    tcfg = eng.cfg.tier(tier)
    channel = ctx.channels.peers(tier)
    groups: dict[str, list[str]] = defaultdict(list)
    for n in sorted(node_ids):
        groups[eng.nodes[n].parent or ""].append(n)
    tasks: list[MixTask] = []
    mixed_weights: dict[str, dict[str, float]] = {}
    for parent, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        edges = mixing.build_graph(
            mixing.GraphSpec(kind=tcfg.peer_graph),
            members,
            np_rng(eng.cfg.seed, "peer-graph", ctx.round, *ctx.key, parent),
        )
        comps = eng.sends_up(sorted(cur[members[0]]), level)
        carried = {
            m: {c: w for c in comps if (w := weights.get(m, {}).get(c, 0.0)) > 0} for m in members
        }
        plan, new_w = mixing.push_sum_plan(members, edges, carried, tcfg.peer_steps)
        mixed_weights.update(new_w)
        tasks += [
            MixTask(node_id=m, round=ctx.round, groups=tuple(plan[m])) for m in members if m in plan
        ]
        # every step sends the same raw values' sizes; a step lasts as long as its slowest sender
        messages = [
            Message(src, dst, {c: state_nbytes(cur[src][c]) for c in comps})
            for i, j in sorted(edges)
            for src, dst in ((members[i], members[j]), (members[j], members[i]))
        ]
        step_s = channel.exchange(
            messages, rnd=ctx.round, key=(*ctx.key, "peer"), repeat=tcfg.peer_steps
        )
        for m in members:
            ctx.times.elapsed[m] = ctx.times.elapsed.get(m, 0.0) + tcfg.peer_steps * step_s
    if tasks:
        handle = ctx.runtime.put({n: cur[n] for n in node_ids})
        for res in ctx.runtime.mix(tasks, handle, {}, []):
            cur[res.node_id] = {**cur[res.node_id], **res.state}
    return mixed_weights


def leaf_graphs(
    eng: TreeEngine, node_ids: list[str], drawn: dict[str, list[str]], ctx: RoundContext
) -> dict[str, frozenset[mixing.Edge]]:
    """Each parent's device-to-device graph over the leaves it sampled (keyed by round and
    node-round)."""
    d2d = eng.d2d
    assert d2d is not None
    return {
        n: mixing.build_graph(
            mixing.GraphSpec(kind=d2d.peer_graph),
            drawn[n],
            np_rng(eng.cfg.seed, "d2d-graph", ctx.round, *ctx.key, n),
        )
        if len(drawn[n]) > 1
        else frozenset()
        for n in node_ids
    }


def d2d_mix(
    eng: TreeEngine,
    node_ids: list[str],
    drawn: dict[str, list[str]],
    graphs: Mapping[str, frozenset[mixing.Edge]],
    alive: set[str],
    shared: dict[str, tuple[str, ...]],
    own: dict[str, State],
    carried: dict[str, dict[str, float]],
    *,
    wire: dict[str, dict[str, int]],
    handle: Any,
    updates: Any,
    expect: dict[str, Expectation],
    ctx: RoundContext,
    pkey: tuple,
) -> dict[str, float]:
    """One pass's mixing among each parent's live leaves; updates ``own`` and ``carried``;
    returns each parent's mixing seconds. ``handle``: the pass's starting states (by leaf),
    ``updates`` the pass's update handle. ``wire``: the encoded sizes of the leaves' updates
    in the first pass, sent in its first step; later values go out raw."""
    steps = eng.d2d.peer_steps if eng.d2d else 0
    channel = ctx.channels.peers(eng.tier_names[-1])
    tasks: list[MixTask] = []
    seconds: dict[str, float] = {}
    for n in node_ids:
        members = drawn[n]
        live = frozenset(
            (i, j) for i, j in graphs[n] if members[i] in alive and members[j] in alive
        )
        plan, weights = mixing.push_sum_plan(
            members, live, {c: carried[c] for c in members if c in alive}, steps
        )
        tasks += [
            MixTask(node_id=c, round=ctx.round, groups=tuple(plan[c])) for c in members if c in plan
        ]
        carried.update(weights)
        total = 0.0
        for s in range(steps):
            messages = []
            for i, j in sorted(live):
                for src, dst in ((members[i], members[j]), (members[j], members[i])):
                    comps = [x for x in shared[src] if x in shared[dst]]
                    if comps:
                        sent = wire.get(src, {}) if s == 0 else {}
                        sizes = {x: int(sent.get(x, state_nbytes(own[src][x]))) for x in comps}
                        messages.append(Message(src, dst, sizes))
            total += channel.exchange(messages, rnd=ctx.round, key=(*pkey, "peer", s))
        seconds[n] = total
    rejected: set[tuple[str, str]] = set()
    for mixed in ctx.runtime.mix(tasks, handle, expect, [updates]):
        own[mixed.node_id] = {**own[mixed.node_id], **mixed.state}
        rejected.update(mixed.rejected)
    ctx.stats.rejections += sorted(rejected)
    return seconds
