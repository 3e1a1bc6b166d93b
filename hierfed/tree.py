"""TreeEngine: runs rounds of any tree of tier nodes on a Runtime (star = depth 1).

Shared by the ``star`` and ``hierarchical`` topologies. Execution is level-synchronous:
all nodes of one tier run their node-round together, so all sampled clients of a round are
trained in one batch across the worker pool, and all nodes of a tier merge in one batch.

One parent-round of a tier node ``n`` at tier index ``l`` (``k = local_rounds`` of its tier):

    start = n's state after taking its parent's components
    repeat k times:
        sample children (keyed by seed, round, node, repetition)
        broadcast n's state to them (ledger: down)
        children train (leaves) or run their own parent-round (inner nodes)
        children send updates (ledger: up); n validates, aggregates, applies its server step
    emit  Update(n.state - start, weight = mean merged weight) for the components whose
          scope reaches n's parent

Components whose scope stops at n's tier are kept by n across rounds; ``local`` ones are
kept per client and never sent.

Semi-decentralized tiers. An inner tier with ``peer_steps > 0`` mixes what its parent
aggregates among siblings after each node-round (``_peer_mix``). The leaf tier does the same
device to device when ``topology.tiers.<leaf>.peer_steps > 0`` (``_train_leaves_d2d``): within
one node-round of their parent the sampled students train from their own state, then mix with
their neighbours on ``peer_graph``, ``local_rounds`` of the leaf tier times, and only then send
``state - broadcast`` to the parent, weighted by their push-sum weights (hierfed.mixing).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from hierfed import mixing
from hierfed.aggregators.robust import check_fanouts
from hierfed.clock import Clock
from hierfed.config import RunConfig, TierConfig
from hierfed.data.federation import Federation
from hierfed.errors import ConfigError, DataError, NodeFailure
from hierfed.ledger import CommLedger
from hierfed.model.spec import ModelSpec
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.base import Runtime
from hierfed.runtime.jobs import ClientMeta, MergeTask, MixTask, TrainJob
from hierfed.seeding import np_rng
from hierfed.update import State, Update, state_nbytes

log = logging.getLogger(__name__)


@dataclass
class Node:
    id: str
    level: int  # tier index: 0 = root
    tier: str
    parent: str | None
    children: list[str] = field(default_factory=list)
    max_weight: float = 0.0  # train rows below this node (bound for validation)


@dataclass
class RoundStats:
    """What one round did, for metrics."""

    participants: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_rows: int = 0
    privacy: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # DP report per client trained this round
    dropped: list[str] = field(default_factory=list)  # sampled children that dropped out
    late: list[str] = field(
        default_factory=list
    )  # children past their parent's deadline: never merged
    sim_time_s: float = 0.0  # simulated wall-clock time of the round (hierfed/clock.py)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.loss_rows if self.loss_rows else float("nan")


class TreeEngine:
    """Holds the tree, every node's state and optimizer state; runs rounds on a runtime."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        federation: Federation,
        spec: ModelSpec,
        paths: dict[str, tuple[str, ...]],
        tier_names: tuple[str, ...],
    ) -> None:
        """``paths``: client id -> its path in this tree (root first, client last)."""
        self.cfg = cfg
        self.fed = federation
        self.spec = spec
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
        self.holds = {cid: spec.holds(profiles[cid]) for cid in self.leaves}
        # robust rules need enough updates per node-round (e.g. Krum: n >= 2f + 3): fail now, not mid-run
        check_fanouts(cfg, [(n.tier, len(n.children)) for n in self.nodes.values() if n.children])
        self.states: dict[str, State] = {}
        self.local: dict[str, State] = {}
        self.privacy: dict[
            str, Any
        ] = {}  # client -> its DP accountant state (travels in TrainJob/ClientMeta)
        self.agg_states: dict[str, Any] = {}
        self.opt_states: dict[str, Any] = {}
        self.clock = Clock(cfg, federation)
        self.elapsed: dict[str, float] = {}  # simulated seconds of a node's latest parent-round
        self.arrival: dict[
            str, float
        ] = {}  # when a child's update reached its parent (from the broadcast)
        self._down_s: dict[str, float] = {}  # how long the broadcast to a child took
        # device-to-device gossip among the leaves of one parent (None: off); checked now, not mid-run
        self.d2d: TierConfig | None = cfg.topology.leaf_peers(tier_names[-1])
        self._check_peer_settings()

    # ---------------------------------------------------------------- helpers

    def init(self, initial: State) -> None:
        for nid in self.nodes:
            if nid not in self.leaves:
                self.states[nid] = dict(initial)
        self.initial = initial

    def _parent(self, node_id: str) -> str:
        parent = self.nodes[node_id].parent
        if parent is None:
            raise DataError(f"'{node_id}' is the root; it has no parent")
        return parent

    def level_of(self, component: str) -> int:
        return self.spec.scope_level(component)

    def sends_up(self, components: Sequence[str], level: int) -> tuple[str, ...]:
        """Of ``components``, those a node at ``level`` sends to its parent."""
        return tuple(c for c in components if self.level_of(c) < level)

    def take_from_parent(self, parent_state: State, own: State, level: int) -> State:
        """A node's starting state: the parent's value of components merged above it, its own otherwise."""
        return {c: (parent_state[c] if self.level_of(c) < level else own[c]) for c in parent_state}

    def sample_size(self, node: Node) -> int:
        """How many children ``node`` samples per node-round (``participation`` of its tier)."""
        p = self.cfg.tier(node.tier).participation
        return min(len(node.children), max(1, int(math.ceil(p * len(node.children) - 1e-9))))

    def sample(self, node: Node, rnd: int, key: tuple) -> list[str]:
        kids = node.children
        m = self.sample_size(node)
        if m >= len(kids):
            return list(kids)
        rng = np_rng(self.cfg.seed, "sample", rnd, *key, node.id)
        return sorted(kids[i] for i in rng.choice(len(kids), size=m, replace=False))

    def dropouts(self, node: Node, sampled: list[str], rnd: int, key: tuple) -> set[str]:
        """Sampled children of ``node`` that drop out after the broadcast (``dropout`` of its tier)."""
        p = self.cfg.tier(node.tier).dropout
        if p <= 0 or not sampled:
            return set()
        u = np_rng(self.cfg.seed, "dropout", rnd, *key, node.id).random(len(sampled))
        return {c for c, x in zip(sampled, u) if x < p}

    def arrive(
        self, child: str, busy_s: float, up_bytes: int, rnd: int, key: tuple, stats: RoundStats
    ) -> bool:
        """Clock a child's report to its parent; False if it missed the parent's deadline.

        ``busy_s``: the child's own work (training, or its subtree's node-rounds). A late child's
        update is never merged; with ``straggler: drop`` it does not even send (no bytes)."""
        parent = self.nodes[self.nodes[child].parent or child]
        tier = self.cfg.tier(parent.tier)
        t = (
            self._down_s.get(child, 0.0)
            + busy_s
            + self.clock.transfer_s(child, up_bytes, rnd=rnd, key=(*key, "up"))
        )
        self.arrival[child] = t
        if tier.deadline_s > 0 and t > tier.deadline_s:
            stats.late.append(child)
            return False
        return True

    def sends_late(self, child: str) -> bool:
        """Whether a late child still transmits (``discard``) rather than stopping (``drop``)."""
        parent = self.nodes[self.nodes[child].parent or child]
        return self.cfg.tier(parent.tier).straggler == "discard"

    def edge(self, child: Node, direction: str = "up") -> str:
        """The tier edge a transfer crosses, written in its direction ("student->institution")."""
        parent = self.nodes[child.parent].tier if child.parent else child.tier
        return f"{child.tier}->{parent}" if direction == "up" else f"{parent}->{child.tier}"

    def personalized_state(self, client_id: str) -> State:
        """Root components plus the client's tier-scoped (ancestors') and local components."""
        node = self.nodes[client_id]
        chain = []
        p = node.parent
        while p is not None:
            chain.append(p)
            p = self.nodes[p].parent
        state = dict(self.states[self.root])
        for nid in reversed(chain[:-1]):  # from the root's children down
            lvl = self.nodes[nid].level
            for c in state:
                if self.level_of(c) >= lvl:
                    state[c] = self.states[nid][c]
        for c, v in self.local.get(client_id, {}).items():
            state[c] = v
        return state

    def _check_peer_settings(self) -> None:
        """ConfigError before any work for leaf-tier settings that would be ignored and for
        peer graphs that cannot be built on the members they would connect.

        The leaf tier does not aggregate: of ``topology.tiers.<leaf>`` only ``peer_steps``,
        ``peer_graph``, ``local_rounds`` (training passes per round of the parent, with
        gossip) and ``postprocess`` (applied to what leaves exchange) mean anything."""
        leaf, above = self.tier_names[-1], self.tier_names[-2]
        key = f"topology.tiers.{leaf}"
        listed = self.cfg.topology.tiers.get(leaf)
        if listed is not None:
            plain = TierConfig()
            kept = {
                "peer_steps",
                "peer_graph",
                "local_rounds",
                "postprocess",
                "postprocess_options",
            }
            for f in fields(TierConfig):
                value = getattr(listed, f.name)
                if f.name not in kept and value != getattr(plain, f.name):
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
        for node in self.nodes.values():
            if not node.children:
                continue
            first = node.children[0]
            if first in self.leaves:
                steps, graph = (self.d2d.peer_steps, self.d2d.peer_graph) if self.d2d else (0, "")
                gkey = f"{key}.peer_graph"
            else:
                tier = self.nodes[first].tier
                steps, graph = self.cfg.tier(tier).peer_steps, self.cfg.tier(tier).peer_graph
                gkey = (
                    f"topology.tiers.{tier}.peer_graph"
                    if tier in self.cfg.topology.tiers
                    else "topology.default.peer_graph"
                )
            m = self.sample_size(node)
            if steps <= 0 or m < 2:
                continue
            # an inner tier's graph is built over the members left after dropouts, which can be
            # any number from 2 to m; a leaf tier's over all it sampled (dropped leaves only
            # lose their links)
            dropout = self.cfg.tier(node.tier).dropout
            sizes = range(2, m + 1) if first not in self.leaves and dropout > 0 else (m,)
            for k in sizes:
                try:
                    mixing.build_graph(
                        mixing.GraphSpec(kind=graph),
                        node.children[:k],
                        np_rng(self.cfg.seed, "peer-graph-check", node.id),
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
                        graph,
                        f"cannot connect them: {left} ({exc.fix}); use ring, torus or complete, "
                        f"or change topology.tiers.{node.tier}.participation",
                    ) from None

    # ---------------------------------------------------------------- the round

    def run_round(self, rnd: int, runtime: Runtime, ledger: CommLedger) -> RoundStats:
        stats = RoundStats()
        root = self.nodes[self.root]
        self._run_level([root.id], {root.id: self.states[root.id]}, rnd, (), runtime, ledger, stats)
        stats.sim_time_s = self.elapsed[root.id]
        return stats

    def _run_level(
        self,
        node_ids: list[str],
        start: dict[str, State],
        rnd: int,
        key: tuple,
        runtime: Runtime,
        ledger: CommLedger,
        stats: RoundStats,
    ) -> dict[str, Update]:
        """One parent-round of every node in ``node_ids`` (all of one tier); returns their emitted updates."""
        level = self.nodes[node_ids[0]].level
        tier = self.tier_names[level]
        k = self.cfg.tier(tier).local_rounds if level > 0 else 1
        cur = dict(start)
        weight_hist: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in node_ids}
        samples = dict.fromkeys(node_ids, 0)  # training rows merged at each node, all node-rounds
        emitted: dict[str, Update] = {}
        child_level = level + 1
        for n in node_ids:
            self.elapsed[n] = 0.0
        for j in range(k):
            jkey = (*key, j)
            sampled = {n: self.sample(self.nodes[n], rnd, jkey) for n in node_ids}
            # broadcast down: each child gets its parent's state (only what it uses)
            for n in node_ids:
                for c in sampled[n]:
                    # a leaf's local components are never sent: it starts them from the seed-built skeleton
                    comps = [
                        x
                        for x in (self.holds[c] if c in self.leaves else cur[n])
                        if self.level_of(x) < child_level
                    ]
                    sizes = {x: state_nbytes(cur[n][x]) for x in comps}
                    ledger.record(
                        round=rnd,
                        src=n,
                        dst=c,
                        edge=self.edge(self.nodes[c], "down"),
                        direction="down",
                        sizes=sizes,
                    )
                    self._down_s[c] = self.clock.transfer_s(
                        c, sum(sizes.values()), rnd=rnd, key=(*jkey, "down")
                    )
            # dropouts vanish after the broadcast: they neither train nor report
            drawn = {n: list(sampled[n]) for n in node_ids}
            for n in node_ids:
                gone = self.dropouts(self.nodes[n], sampled[n], rnd, jkey)
                stats.dropped += sorted(gone)
                sampled[n] = [c for c in sampled[n] if c not in gone]
                self.arrival.update({c: math.inf for c in gone})
            if child_level == len(self.tier_names) - 1:
                if self.d2d is None:
                    sources, expectations = self._train_leaves(
                        node_ids, sampled, cur, rnd, jkey, runtime, ledger, stats
                    )
                else:
                    sources, expectations = self._train_leaves_d2d(
                        node_ids, drawn, sampled, cur, rnd, jkey, runtime, ledger, stats
                    )
            else:
                kids = [c for n in node_ids for c in sampled[n]]
                kid_start = {
                    c: self.take_from_parent(cur[self._parent(c)], self.states[c], child_level)
                    for c in kids
                }
                ups = (
                    self._run_level(kids, kid_start, rnd, jkey, runtime, ledger, stats)
                    if kids
                    else {}
                )
                sources = [ups]
                # with peer mixing, push-sum moves weight between siblings: a child's bound is
                # then its sampled siblings' rows together, not its own
                bound = {c: self.nodes[c].max_weight for c in kids}
                if self.cfg.tier(self.tier_names[child_level]).peer_steps > 0:
                    group: dict[str, float] = defaultdict(float)
                    for c in kids:
                        group[self._parent(c)] += self.nodes[c].max_weight
                    bound = {c: group[self._parent(c)] for c in kids}
                expectations = {
                    c: Expectation(
                        c,
                        frozenset(self.sends_up(list(cur[self._parent(c)]), child_level)),
                        exact=False,
                        max_weight=bound[c],
                    )
                    for c in kids
                    if c in ups
                }
            # the node-round lasts until its last on-time child reported, or until the deadline
            # when a sampled child dropped out or was late
            for n in node_ids:
                deadline = self.cfg.tier(tier).deadline_s
                times = [self.arrival.get(c, math.inf) for c in drawn[n]]
                on_time = [t for t in times if t < math.inf and (deadline <= 0 or t <= deadline)]
                waited = max(on_time, default=0.0)
                if deadline > 0 and len(on_time) < len(times):
                    waited = deadline
                self.elapsed[n] += waited
            tasks = []
            for n in node_ids:
                tasks.append(
                    MergeTask(
                        node_id=n,
                        tier=tier,
                        round=rnd,
                        key=jkey,
                        expectations=tuple(
                            expectations[c] for c in sampled[n] if c in expectations
                        ),
                        state=cur[n],
                        agg_state=self.agg_states.get(n),
                        opt_state=self.opt_states.get(n),
                    )
                )
            results = runtime.merge(tasks, sources)
            self._check_quorum(tasks, results, tier, rnd, stats)
            for res in results:
                n = res.node_id
                samples[n] += res.num_samples
                cur[n] = res.state
                self.agg_states[n], self.opt_states[n] = res.agg_state, res.opt_state
                stats.rejections += [(s, f"{n}: {r}") for s, r in res.rejected]
                for c, w in res.weights.items():
                    weight_hist[n][c].append(w)
                for c in cur[n]:
                    if c not in res.weights:
                        weight_hist[n][c].append(0.0)
            if level > 0 and self.cfg.tier(tier).peer_steps > 0:
                last = {res.node_id: res.weights for res in results}
                mixed = self._peer_mix(node_ids, cur, last, rnd, jkey, runtime, ledger)
                for n, ws in mixed.items():  # push-sum: weights move with the values
                    for c, w in ws.items():
                        weight_hist[n][c][-1] = w
        # emit each non-root node's update for its parent (on the workers: tensor math there);
        # its weight per component is the mean merged weight over the k node-rounds
        if level > 0:
            emit_tasks = []
            for n in node_ids:
                node = self.nodes[n]
                sends = self.sends_up(list(cur[n]), level)
                emit_w = {
                    c: sum(weight_hist[n][c]) / k for c in sends if sum(weight_hist[n][c]) > 0
                }
                emit_tasks.append(
                    MergeTask(
                        node_id=n,
                        tier=tier,
                        round=rnd,
                        key=(*key, "emit"),
                        expectations=(),
                        state=cur[n],
                        emit=True,
                        start=start[n],
                        sends=sends,
                        emit_weights=emit_w,
                        parent_id=node.parent or "",
                        parent_tier=self.nodes[node.parent].tier if node.parent else "",
                        emit_samples=samples[n],
                    )
                )
            for res in runtime.merge(emit_tasks, []):
                node = self.nodes[res.node_id]
                up = sum(res.emitted_sizes.values()) if res.emitted is not None else 0
                in_time = self.arrive(res.node_id, self.elapsed[res.node_id], up, rnd, key, stats)
                if res.emitted is not None and (in_time or self.sends_late(res.node_id)):
                    ledger.record(
                        round=rnd,
                        src=res.node_id,
                        dst=node.parent or "",
                        edge=self.edge(node),
                        direction="up",
                        sizes=res.emitted_sizes,
                    )
                if res.emitted is not None and in_time:
                    emitted[res.node_id] = res.emitted
        for n in node_ids:
            self.states[n] = cur[n]
        return emitted

    def _check_quorum(
        self,
        tasks: Sequence[MergeTask],
        results: Sequence[Any],
        tier: str,
        rnd: int,
        stats: RoundStats,
    ) -> None:
        """Every node-round needs ``quorum`` of its expected children's updates, else NodeFailure."""
        quorum = self.cfg.tier(tier).quorum
        for task, res in zip(tasks, results):
            why = _quorum_failure(task, len(res.accepted), quorum, stats)
            if why is not None:
                raise NodeFailure(task.node_id, rnd, why)

    def _peer_mix(
        self,
        node_ids: list[str],
        cur: dict[str, State],
        weights: dict[str, dict[str, float]],
        rnd: int,
        key: tuple,
        runtime: Runtime,
        ledger: CommLedger,
    ) -> dict[str, dict[str, float]]:
        """Semi-decentralized: after a node-round, siblings (same parent) of this tier mix the
        components their parent aggregates, ``peer_steps`` times on a ``peer_graph``
        (hierfed.mixing). Push-sum with carried weights, as for leaf gossip: each node enters
        with what it merged of a component this node-round, and leaves with its value and
        weight after mixing (``mixing.push_sum_plan``), so the weighted sum the parent merges
        is the same as without mixing, on any graph. Nodes that merged nothing of a component
        this node-round neither send nor receive it. Every new state is computed before any
        is set. Returns the new weights (node -> component -> weight)."""
        level = self.nodes[node_ids[0]].level
        tier = self.nodes[node_ids[0]].tier
        tcfg = self.cfg.tier(tier)
        groups: dict[str, list[str]] = defaultdict(list)
        for n in sorted(node_ids):
            groups[self.nodes[n].parent or ""].append(n)
        tasks = []
        mixed_weights: dict[str, dict[str, float]] = {}
        for parent, members in sorted(groups.items()):
            if len(members) < 2:
                continue
            spec = mixing.GraphSpec(kind=tcfg.peer_graph)
            edges = mixing.build_graph(
                spec, members, np_rng(self.cfg.seed, "peer-graph", rnd, *key, parent)
            )
            comps = self.sends_up(sorted(cur[members[0]]), level)
            carried = {
                m: {c: w for c in comps if (w := weights.get(m, {}).get(c, 0.0)) > 0}
                for m in members
            }
            plan, new_w = mixing.push_sum_plan(members, edges, carried, tcfg.peer_steps)
            mixed_weights.update(new_w)
            tasks += [
                MixTask(node_id=m, round=rnd, groups=tuple(plan[m])) for m in members if m in plan
            ]
            # a step lasts until the slowest member has pushed its values to all its neighbours
            # through its own link (as for leaf gossip): a denser graph costs time, not only bytes
            out: dict[str, int] = defaultdict(int)
            for i, j in sorted(edges):
                a, b = members[i], members[j]
                for src, dst in ((a, b), (b, a)):
                    sizes = {c: state_nbytes(cur[src][c]) for c in comps}
                    for _ in range(tcfg.peer_steps):
                        ledger.record(
                            round=rnd,
                            src=src,
                            dst=dst,
                            edge=f"{tier}<->{tier}",
                            direction="peer",
                            sizes=sizes,
                        )
                    out[src] += sum(sizes.values())
            step_s = max(
                (
                    self.clock.transfer_s(src, nbytes, rnd=rnd, key=(*key, "peer"))
                    for src, nbytes in sorted(out.items())
                ),
                default=0.0,
            )
            for m in members:
                self.elapsed[m] = self.elapsed.get(m, 0.0) + tcfg.peer_steps * step_s
        if tasks:
            for res in runtime.mix(tasks, runtime.put({n: cur[n] for n in node_ids}), {}, []):
                cur[res.node_id] = {**cur[res.node_id], **res.state}
        return mixed_weights

    def _ordinal(self, key: tuple) -> int:
        """Which of its training passes in round ``rnd`` a leaf is on, from the local-round
        indices of the tiers above it. Keys training by this rather than by the tree path,
        so trees that differ only by tiers with one local round train identically. (With leaf
        gossip, pass ``r`` of ``R`` per parent round is ``_ordinal(key) * R + r``.)"""
        o = 0
        for level, j in enumerate(key):
            k = self.cfg.tier(self.tier_names[level]).local_rounds if level > 0 else 1
            o = o * k + int(j)
        return o

    def _leaf_job(self, c: str, start_from: str, tier: str, rnd: int, ordinal: int) -> TrainJob:
        """Leaf ``c``'s training job: from the state keyed ``start_from`` in the round's handle,
        through ``tier``'s postprocess chain, keyed by its pass ``ordinal`` in the round."""
        return TrainJob(
            client_id=c,
            parent_id=start_from,
            tier=tier,
            round=rnd,
            key=(rnd, ordinal, c),
            trains=self.holds[c],
            sends=self.sends_up(self.holds[c], len(self.tier_names) - 1),
            local=self.local.get(c),
            privacy=self.privacy.get(c),
        )

    def _train_leaves(
        self,
        node_ids: list[str],
        sampled: dict[str, list[str]],
        cur: dict[str, State],
        rnd: int,
        key: tuple,
        runtime: Runtime,
        ledger: CommLedger,
        stats: RoundStats,
    ) -> tuple[list[Any], dict[str, Expectation]]:
        level = len(self.tier_names) - 1
        jobs: list[TrainJob] = []
        expectations: dict[str, Expectation] = {}
        for n in node_ids:
            for c in sampled[n]:
                sends = self.sends_up(self.holds[c], level)
                jobs.append(self._leaf_job(c, n, self.nodes[n].tier, rnd, self._ordinal(key)))
                expectations[c] = Expectation(
                    c, frozenset(sends), exact=True, max_weight=self.nodes[c].max_weight
                )
        jobs.sort(key=lambda j: j.client_id)
        states_handle = runtime.put({n: cur[n] for n in node_ids})
        metas, updates = runtime.train(jobs, states_handle)
        self._account(metas, rnd, ledger, stats, key)
        for c in stats.late:
            expectations.pop(c, None)  # a late update is never merged (nor kept for later)
        return [updates], expectations

    def _train_leaves_d2d(
        self,
        node_ids: list[str],
        drawn: dict[str, list[str]],
        sampled: dict[str, list[str]],
        cur: dict[str, State],
        rnd: int,
        key: tuple,
        runtime: Runtime,
        ledger: CommLedger,
        stats: RoundStats,
    ) -> tuple[list[Any], dict[str, Expectation]]:
        """Leaf gossip: one node-round of every parent in ``node_ids`` with device-to-device
        mixing among its sampled leaves; returns the leaves' updates and expectations, like
        ``_train_leaves``.

        Repeated ``R = local_rounds`` times (of the leaf tier): every present leaf trains from
        its own state (pass ``r`` keyed as ``_ordinal(key) * R + r``; its first state is the
        broadcast, so with ``R = 1`` it trains exactly as without gossip); the leaf tier's
        ``postprocess`` chain applies to that update; then the leaves of one parent mix the
        components they send up with their neighbours on ``peer_graph``, ``peer_steps`` times
        (push-sum with carried weights, ``mixing.push_sum_plan``; every new value is computed
        on the workers before any is kept). Then each leaf sends ``state - broadcast`` with its
        carried weights (its training rows at first) through the parent tier's chain. Mixing
        never changes the ``w``-weighted sum the parent merges, on any graph.

        The graph is drawn over the sampled leaves (``drawn``, keyed by seed, round and
        parent); dropped-out leaves and leaves whose training failed lose their links (they
        neither train nor mix nor send from then on). Leaves of one parent move in lockstep:
        each pass lasts as long as the slowest training plus, per mixing step, the slowest
        member to send its neighbours their values; the parent's deadline applies to the
        report that follows. Every exchange
        is a ledger record (``direction="peer"``, edge ``<leaf><-><leaf>``).
        """
        d2d = self.d2d
        if d2d is None:
            raise RuntimeError("_train_leaves_d2d needs topology.tiers.<leaf>.peer_steps > 0")
        level = len(self.tier_names) - 1
        leaf = self.tier_names[level]
        edge = f"{leaf}<->{leaf}"
        passes = d2d.local_rounds
        first = self._ordinal(key) * passes
        parent = {c: n for n in node_ids for c in sampled[n]}
        shared = {c: self.sends_up(self.holds[c], level) for c in parent}
        # each leaf's own values of what it sends up, and its push-sum weight for each
        own: dict[str, State] = {c: {x: cur[parent[c]][x] for x in shared[c]} for c in parent}
        carried = {c: dict.fromkeys(shared[c], self.nodes[c].max_weight) for c in parent}
        graphs: dict[str, frozenset[mixing.Edge]] = {}
        for n in node_ids:
            graphs[n] = (
                mixing.build_graph(
                    mixing.GraphSpec(kind=d2d.peer_graph),
                    drawn[n],
                    np_rng(self.cfg.seed, "d2d-graph", rnd, *key, n),
                )
                if len(drawn[n]) > 1
                else frozenset()
            )
        alive = set(parent)
        trained: set[str] = set()
        busy = dict.fromkeys(node_ids, 0.0)
        for r in range(passes):
            pkey = (*key, "d2d", r)
            order = sorted(alive)
            handle = runtime.put({c: {**cur[parent[c]], **own[c]} for c in order})
            # each starts from its own state (the handle is keyed by leaf); the leaf tier's
            # chain applies to what leaves send each other
            jobs = [self._leaf_job(c, c, leaf, rnd, first + r) for c in order]
            metas, updates = runtime.train(jobs, handle)
            wire: dict[str, dict[str, int]] = {}
            compute = dict.fromkeys(node_ids, 0.0)
            for m in metas:
                c = m.client_id
                if m.error is not None:
                    stats.failures.append((c, m.error.splitlines()[0]))
                    self.arrival[c] = math.inf
                    alive.discard(c)
                    continue
                if m.privacy is not None:
                    self.privacy[c] = m.privacy
                    stats.privacy[c] = m.privacy.report()
                if m.local:
                    self.local[c] = m.local
                if m.privacy is not None and m.privacy.status == "budget_spent":
                    continue  # sits this pass out (its DP budget is spent); still mixes
                trained.add(c)
                stats.loss_sum += m.loss * m.num_samples
                stats.loss_rows += m.num_samples
                wire[c] = m.sizes
                busy_c = self.clock.compute_s(c, rnd=rnd, key=pkey)
                compute[parent[c]] = max(compute[parent[c]], busy_c)
            expect = {
                c: Expectation(
                    c, frozenset(shared[c]), exact=True, max_weight=self.nodes[c].max_weight
                )
                for c in wire
                if shared[c]
            }
            tasks: list[MixTask] = []
            for n in node_ids:
                members = drawn[n]
                live = frozenset(
                    (i, j) for i, j in graphs[n] if members[i] in alive and members[j] in alive
                )
                plan, weights = mixing.push_sum_plan(
                    members, live, {c: carried[c] for c in members if c in alive}, d2d.peer_steps
                )
                tasks += [
                    MixTask(node_id=c, round=rnd, groups=tuple(plan[c]))
                    for c in members
                    if c in plan
                ]
                carried.update(weights)
                mix_s = self._record_d2d(
                    members,
                    live,
                    shared,
                    own,
                    wire if r == 0 else {},
                    steps=d2d.peer_steps,
                    rnd=rnd,
                    key=pkey,
                    ledger=ledger,
                    edge=edge,
                )
                busy[n] += compute[n] + mix_s
            rejected: set[tuple[str, str]] = set()
            for mixed in runtime.mix(tasks, handle, expect, [updates]):
                own[mixed.node_id] = {**own[mixed.node_id], **mixed.state}
                rejected.update(mixed.rejected)
            stats.rejections += sorted(rejected)
        stats.participants += len(trained)
        # report to the parent: state - broadcast, weighted by the carried weights, through the
        # parent tier's chain (an emitting MergeTask with nothing to merge does exactly that)
        group_rows = {n: sum(self.nodes[c].max_weight for c in sampled[n]) for n in node_ids}
        emits = []
        for c in sorted(alive):
            n = parent[c]
            if not shared[c]:
                self.arrive(c, busy[n], 0, rnd, key, stats)
                continue
            emits.append(
                MergeTask(
                    node_id=c,
                    tier=leaf,
                    round=rnd,
                    key=(*key, "d2d-report"),
                    expectations=(),
                    state={**cur[n], **own[c]},
                    emit=True,
                    start=cur[n],
                    sends=shared[c],
                    emit_weights=dict(carried[c]),
                    parent_id=n,
                    parent_tier=self.nodes[n].tier,
                    emit_samples=int(self.nodes[c].max_weight),  # the leaf's training rows
                )
            )
        ups: dict[str, Update] = {}
        for res in runtime.merge(emits, []):
            c, n = res.node_id, parent[res.node_id]
            up = sum(res.emitted_sizes.values()) if res.emitted is not None else 0
            in_time = self.arrive(c, busy[n], up, rnd, key, stats)
            if res.emitted is not None and (in_time or self.sends_late(c)):
                ledger.record(
                    round=rnd,
                    src=c,
                    dst=n,
                    edge=self.edge(self.nodes[c]),
                    direction="up",
                    sizes=res.emitted_sizes,
                )
            if res.emitted is not None and in_time:
                ups[c] = res.emitted
        # every present student is expected (a failed one counts against the quorum, as without
        # gossip); a late one is not merged. Carried weights move between siblings, so the bound
        # on a weight is the group's rows, not the student's own.
        expectations = {
            c: Expectation(c, frozenset(shared[c]), exact=True, max_weight=group_rows[parent[c]])
            for c in parent
            if c not in stats.late
        }
        return [ups], expectations

    def _record_d2d(
        self,
        members: list[str],
        live: frozenset[mixing.Edge],
        shared: dict[str, tuple[str, ...]],
        own: dict[str, State],
        wire: dict[str, dict[str, int]],
        *,
        steps: int,
        rnd: int,
        key: tuple,
        ledger: CommLedger,
        edge: str,
    ) -> float:
        """Ledger records for one pass's mixing among ``members`` (one per direction of every
        live link, per step, of the components both ends send up); returns its simulated
        seconds: per step, the slowest member to push everything it sends its neighbours
        through its own link (so a denser graph costs more time, not only more bytes).

        ``wire``: the encoded sizes of the leaves' updates in the first pass, sent in its first
        step (every member knows the broadcast they apply to); later values go out raw."""
        total = 0.0
        for s in range(steps):
            out: dict[str, int] = defaultdict(int)
            for i, j in sorted(live):
                a, b = members[i], members[j]
                for src, dst in ((a, b), (b, a)):
                    comps = [x for x in shared[src] if x in shared[dst]]
                    if not comps:
                        continue
                    sent = wire.get(src, {}) if s == 0 else {}
                    sizes = {x: int(sent.get(x, state_nbytes(own[src][x]))) for x in comps}
                    ledger.record(
                        round=rnd, src=src, dst=dst, edge=edge, direction="peer", sizes=sizes
                    )
                    out[src] += sum(sizes.values())
            total += max(
                (
                    self.clock.transfer_s(src, nbytes, rnd=rnd, key=(*key, "peer", s))
                    for src, nbytes in sorted(out.items())
                ),
                default=0.0,
            )
        return total

    def _account(
        self,
        metas: list[ClientMeta],
        rnd: int,
        ledger: CommLedger,
        stats: RoundStats,
        key: tuple = (),
    ) -> None:
        for m in metas:
            if m.error is not None:
                stats.failures.append((m.client_id, m.error.splitlines()[0]))
                self.arrival[m.client_id] = math.inf
                continue
            busy = self.clock.compute_s(m.client_id, rnd=rnd, key=key)
            if not self.arrive(
                m.client_id, busy, sum(m.sizes.values()), rnd, key, stats
            ) and not self.sends_late(m.client_id):
                m = replace(m, sizes={})  # told to stop at the deadline: it sends nothing
            if m.privacy is not None:  # the DP accountant state travels with the client
                self.privacy[m.client_id] = m.privacy
                stats.privacy[m.client_id] = m.privacy.report()
            if m.privacy is not None and m.privacy.status == "budget_spent":
                continue  # sat out: its DP budget is spent (reported in stats.privacy)
            stats.participants += 1
            stats.loss_sum += m.loss * m.num_samples
            stats.loss_rows += m.num_samples
            if m.local:
                self.local[m.client_id] = m.local
            if m.sizes:
                node = self.nodes[m.client_id]
                ledger.record(
                    round=rnd,
                    src=m.client_id,
                    dst=m.parent_id,
                    edge=self.edge(node),
                    direction="up",
                    sizes=m.sizes,
                )


def _quorum_failure(task: MergeTask, accepted: int, quorum: float, stats: RoundStats) -> str | None:
    expected = len(task.expectations)
    if expected == 0 or accepted >= quorum * expected - 1e-9:
        return None
    senders = {e.sender for e in task.expectations}
    why = [f"{c}: {r}" for c, r in stats.failures if c in senders][:3]
    why += [f"{c}: rejected ({r})" for c, r in stats.rejections if c in senders][:3]
    return f"quorum {quorum:g} not met: {accepted}/{expected} updates arrived and passed" + (
        f" ({'; '.join(why)})" if why else ""
    )


def require_no_failures(
    stats: RoundStats, rnd: int, tolerate: Callable[[RoundStats], bool] | None = None
) -> None:
    """Raise NodeFailure for the first failed client unless ``tolerate`` accepts the round."""
    if stats.failures and not (tolerate and tolerate(stats)):
        cid, cause = stats.failures[0]
        raise NodeFailure(cid, rnd, cause)
