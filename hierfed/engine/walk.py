"""TreeEngine: the round walk over any tree of tier nodes (star = depth 1).

Execution is level-synchronous: all nodes of one tier run their node-round together, so all
sampled clients of a round train in one batch across the worker pool, and all nodes of a
tier merge in one batch.

One parent-round of a tier node ``n`` at tier index ``l`` (``k = local_rounds`` of its tier):

    start = n's state after taking its parent's components
    repeat k times (node-round j, context key extended by j):
        sample members; broadcast n's state to them (down channel); dropouts vanish
        members train (leaves, hierfed.engine.leaves) or run their own parent-round
        members report (up channel: ledger, clock, deadline); n validates, aggregates and
        applies its server step on a worker; siblings may mix (hierfed.engine.peers)
    emit  Update(n.state - start, weight = mean merged weight) for the components whose
          scope reaches n's parent

Components whose scope stops at n's tier are kept by n across rounds; ``local`` ones are kept
per client (``ClientStore``) and never sent.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hierfed.config import RunConfig, TierConfig
from hierfed.continual.engine import continual_engine
from hierfed.data.federation import Federation
from hierfed.engine import leaves, peers
from hierfed.engine.broadcast import broadcast
from hierfed.engine.checks import check_tree
from hierfed.engine.context import RoundContext
from hierfed.engine.graph import TreeGraph
from hierfed.engine.sampling import draw
from hierfed.engine.stats import ClientStore, RoundStats, quorum_failure
from hierfed.errors import NodeFailure
from hierfed.model.spec import ModelSpec
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeResult, MergeTask
from hierfed.unlearning.exclusion import excluded_clients, excluded_members
from hierfed.update import State, Update

log = logging.getLogger(__name__)


@dataclass
class LevelRun:
    """What one tier's parent-round accumulates over its ``k`` node-rounds."""

    cur: dict[str, State]
    weights: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    stats: dict[str, list[tuple[int, dict[str, float]]]] = field(default_factory=dict)


class TreeEngine:
    """Holds the tree, every node's state and optimizer state; runs rounds on a runtime."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        federation: Federation,
        spec: ModelSpec,
        graph: TreeGraph,
        clients: ClientStore,
    ) -> None:
        self.cfg, self.fed, self.spec, self.graph = cfg, federation, spec, graph
        self.tier_names = graph.tier_names
        self.nodes, self.leaves, self.root = graph.nodes, graph.leaves, graph.root
        self.clients = clients
        profiles = federation.by_id
        self.holds = {cid: spec.holds(profiles[cid]) for cid in self.leaves}
        self.resource = {cid: profiles[cid].resource for cid in self.leaves}
        check_tree(cfg, graph)
        # members dropped right after sampling (``exclude``: unlearning); empty by default
        below: dict[str, list[str]] = defaultdict(list)
        for leaf in self.leaves:
            for nid in (leaf, *graph.ancestors(leaf)):
                below[nid].append(leaf)
        self.excluded = excluded_members(excluded_clients(cfg, federation), below)
        self.below, self.trains = below, self.holds  # trains: holds less frozen components
        self.anchors: dict[int, State] = {}  # continual EWC: round -> global state then
        self.continual = continual_engine(self)  # hierfed/continual; None unless scheduled
        self.states: dict[str, State] = {}
        self.agg_states: dict[str, Any] = {}
        self.opt_states: dict[str, Any] = {}
        # device-to-device gossip among the leaves of one parent (None: off)
        self.d2d: TierConfig | None = cfg.topology.leaf_peers(self.tier_names[-1])

    def init(self, initial: State) -> None:
        for nid in self.nodes:
            if nid not in self.leaves:
                self.states[nid] = dict(initial)
        self.initial = initial

    # ---------------------------------------------------------------- scopes

    def level_of(self, component: str) -> int:
        return self.spec.scope_level(component)

    def sends_up(self, components: Sequence[str], level: int) -> tuple[str, ...]:
        """Of ``components``, those a node at ``level`` sends to its parent."""
        return tuple(c for c in components if self.level_of(c) < level)

    def take_from_parent(self, parent_state: State, own: State, level: int) -> State:
        """A node's starting state: the parent's value of components merged above it, its own otherwise."""
        return {c: (parent_state[c] if self.level_of(c) < level else own[c]) for c in parent_state}

    def global_state(self) -> State:
        """The root's state; continual: with not-yet-existing components at their initial value."""
        root = self.states[self.root]
        return root if self.continual is None else {**self.initial, **root}

    def personalized_state(self, client_id: str) -> State:
        """Root components plus the client's tier-scoped (ancestors') and local components."""
        state = dict(self.global_state())
        for nid in reversed(self.graph.ancestors(client_id)[:-1]):  # from the root's children down
            lvl = self.nodes[nid].level
            for c in state:
                if self.level_of(c) >= lvl and c in self.states[nid]:
                    state[c] = self.states[nid][c]
        for c, v in self.clients.local.get(client_id, {}).items():
            state[c] = v
        return state

    def ordinal(self, key: tuple) -> int:
        """Which of its training passes in round ``rnd`` a leaf is on, from the local-round
        indices of the tiers above it. Keys training by this rather than by the tree path,
        so trees that differ only by tiers with one local round train identically. (With leaf
        gossip, pass ``r`` of ``R`` per parent round is ``ordinal(key) * R + r``.)"""
        o = 0
        for level, j in enumerate(key):
            k = self.cfg.tier(self.tier_names[level]).local_rounds if level > 0 else 1
            o = o * k + int(j)
        return o

    # ---------------------------------------------------------------- the round

    def run_round(self, ctx: RoundContext) -> RoundStats:
        if ctx.clients is not self.clients:
            raise ValueError(
                "a round's context must carry its topology's client store (topo.clients)"
            )
        root = self.root
        if self.continual is not None:  # who is in, what exists and who holds what this round
            self.continual.enter_round(ctx.round)
        self._run_level([root], {root: self.states[root]}, ctx)
        ctx.stats.sim_time_s = ctx.times.elapsed[root]
        ctx.stats.late += ctx.times.late
        return ctx.stats

    def _run_level(
        self, node_ids: list[str], start: dict[str, State], ctx: RoundContext
    ) -> dict[str, Update]:
        """One parent-round of every node in ``node_ids`` (all of one tier); returns their
        emitted updates."""
        level = self.nodes[node_ids[0]].level
        tier = self.tier_names[level]
        k = self.cfg.tier(tier).local_rounds if level > 0 else 1
        run = LevelRun(
            cur=dict(start),
            weights={n: defaultdict(list) for n in node_ids},
            samples=dict.fromkeys(node_ids, 0),
        )
        for n in node_ids:
            ctx.times.elapsed[n] = 0.0
        # without sibling mixing a node's update leaves with its last merge (one trip to a
        # worker); mixing comes between the last merge and the emit, so then it is its own task
        fold = level > 0 and self.cfg.tier(tier).peer_steps == 0
        results: list[MergeResult] = []
        for j in range(k):
            last = fold and j == k - 1
            results = self._node_round(node_ids, run, ctx.at(j), emit_from=start if last else None)
        emitted = {}
        if level > 0:
            emitted = self._report(results if fold else self._emit(node_ids, run, start, ctx), ctx)
        for n in node_ids:
            self.states[n] = run.cur[n]
        return emitted

    def _node_round(
        self,
        node_ids: list[str],
        run: LevelRun,
        ctx: RoundContext,
        *,
        emit_from: dict[str, State] | None,
    ) -> list[MergeResult]:
        """Node-round ``ctx.key[-1]`` of every node in ``node_ids``: sample, broadcast, the
        members' work, merge (emitting from ``emit_from`` when given), and (with
        ``peer_steps``) sibling mixing."""
        level = self.nodes[node_ids[0]].level
        tier = self.tier_names[level]
        tcfg = self.cfg.tier(tier)
        child_level = level + 1
        draws = {
            n: draw(
                seed=self.cfg.seed,
                node=n,
                members=self.nodes[n].children,
                tier=tcfg,
                rnd=ctx.round,
                key=ctx.key,
                excluded=self.excluded,
                classes=self.resource if child_level == self.graph.leaf_level else None,
            )
            for n in node_ids
        }
        full = {n: d.full for n, d in draws.items()}
        sampled = {n: d.sampled for n, d in draws.items()}
        sent = broadcast(self, sampled, run.cur, ctx)  # what the members receive (decoded)
        # dropouts vanish after the broadcast: they neither train nor report
        drawn = {n: list(sampled[n]) for n in node_ids}
        for n in node_ids:
            ctx.stats.dropped += sorted(draws[n].gone)
            sampled[n] = [c for c in sampled[n] if c not in draws[n].gone]
            ctx.times.never(draws[n].gone)
        if child_level == self.graph.leaf_level:
            if self.d2d is None:
                sources, expect = leaves.train(self, node_ids, sampled, sent, ctx)
            else:
                # the device-to-device graph spans the full draw (an excluded leaf's links are
                # down, as a dropout's), so the others' graphs stay the same
                sources, expect = leaves.train_d2d(self, node_ids, full, sampled, sent, ctx)
        else:
            sources, expect = self._inner_members(sampled, sent, ctx)
        # the node-round lasts until its last on-time member reported, or until the deadline
        # when a sampled member dropped out or was late
        for n in node_ids:
            channel = ctx.channels.edge(self.nodes[self.nodes[n].children[0]].tier, tier)
            ctx.times.elapsed[n] += channel.waited(ctx.times, drawn[n])
        return self._merge(node_ids, sampled, expect, sources, run, ctx, emit_from=emit_from)

    def _inner_members(
        self, sampled: dict[str, list[str]], cur: dict[str, State], ctx: RoundContext
    ) -> tuple[list[Any], dict[str, Expectation]]:
        """Sampled inner members (``sampled``: node -> members) run their own parent-round from
        ``cur`` (their parents' broadcasts); their emitted updates and what each must send."""
        child_level = self.nodes[next(iter(sampled))].level + 1
        kids = [c for members in sampled.values() for c in members]
        kid_start = {
            c: self.take_from_parent(cur[self.graph.parent(c)], self.states[c], child_level)
            for c in kids
        }
        ups = self._run_level(kids, kid_start, ctx) if kids else {}
        # with peer mixing, push-sum moves weight between siblings: a member's bound is then
        # its sampled siblings' rows together, not its own
        bound = {c: self.nodes[c].max_weight for c in kids}
        if self.cfg.tier(self.tier_names[child_level]).peer_steps > 0:
            group: dict[str, float] = defaultdict(float)
            for c in kids:
                group[self.graph.parent(c)] += self.nodes[c].max_weight
            bound = {c: group[self.graph.parent(c)] for c in kids}
        expect = {
            c: Expectation(
                c,
                frozenset(self.sends_up(list(cur[self.graph.parent(c)]), child_level)),
                exact=False,
                max_weight=bound[c],
            )
            for c in kids
            if c in ups
        }
        return [ups], expect

    def _merge(
        self,
        node_ids: list[str],
        sampled: dict[str, list[str]],
        expect: dict[str, Expectation],
        sources: list[Any],
        run: LevelRun,
        ctx: RoundContext,
        *,
        emit_from: dict[str, State] | None,
    ) -> list[MergeResult]:
        """Validate, aggregate and step every node on the workers; quorum; sibling mixing."""
        level = self.nodes[node_ids[0]].level
        tier = self.tier_names[level]
        tasks = [
            MergeTask(
                node_id=n,
                tier=tier,
                round=ctx.round,
                key=ctx.key,
                expectations=tuple(expect[c] for c in sampled[n] if c in expect),
                state=run.cur[n],
                agg_state=self.agg_states.get(n),
                opt_state=self.opt_states.get(n),
                memory=ctx.clients.memory_of(sampled[n]),
                **(
                    {"emit": True, **self._emit_fields(n, run, emit_from[n], folded=True)}
                    if emit_from
                    else {}
                ),
            )
            for n in node_ids
        ]
        results = ctx.runtime.merge(tasks, sources)
        quorum = self.cfg.tier(tier).quorum
        for task, res in zip(tasks, results):
            senders = {e.sender for e in task.expectations}
            why = quorum_failure(senders, len(res.accepted), quorum, ctx.stats)
            if why is not None:
                raise NodeFailure(task.node_id, ctx.round, why)
        for res in results:
            n = res.node_id
            run.samples[n] += res.num_samples
            run.stats.setdefault(n, []).append((res.num_samples, res.stats))
            run.cur[n] = res.state
            self.agg_states[n], self.opt_states[n] = res.agg_state, res.opt_state
            ctx.stats.rejections += [(s, f"{n}: {r}") for s, r in res.rejected]
            ctx.stats.contributed(res.contributions)
            ctx.clients.codec.update(res.memory)
            if res.secagg is not None:  # its extra messages: in the ledger, on the clock
                ctx.stats.dropped += list(res.secagg.dropped)
                edge = ctx.channels.edge(self.nodes[self.nodes[n].children[0]].tier, tier)
                ctx.times.elapsed[n] += edge.secure_round(ctx.round, n, res.secagg, ctx.key)
            for c, w in res.weights.items():
                run.weights[n][c].append(w)
            for c in run.cur[n]:
                if c not in res.weights:
                    run.weights[n][c].append(0.0)
        if level > 0 and self.cfg.tier(tier).peer_steps > 0:
            last = {res.node_id: res.weights for res in results}
            mixed = peers.mix_siblings(self, node_ids, run.cur, last, ctx)
            for n, ws in mixed.items():  # push-sum: weights move with the values
                for c, w in ws.items():
                    run.weights[n][c][-1] = w
        return results

    def _emit_fields(self, n: str, run: LevelRun, start: State, *, folded: bool) -> dict[str, Any]:
        """What a MergeTask needs to emit node ``n``'s update for its parent: its weight per
        component is the mean merged weight over the tier's ``local_rounds`` node-rounds (a
        folded emit gets the earlier node-rounds' weights and adds its own merge's)."""
        node = self.nodes[n]
        sends = self.sends_up(list(run.cur[n]), node.level)
        hist = run.weights[n]
        k = self.cfg.tier(node.tier).local_rounds
        fields: dict[str, Any] = {
            "start": start,
            "sends": sends,
            "parent_id": node.parent or "",
            "parent_tier": self.nodes[node.parent].tier if node.parent else "",
            "emit_samples": run.samples[n],
            "emit_stats": tuple(run.stats.get(n, ())),
        }
        if folded:
            fields["emit_prior"] = {c: tuple(hist[c]) for c in sends}
            fields["local_rounds"] = k
        else:
            fields["emit_weights"] = {c: sum(hist[c]) / k for c in sends if sum(hist[c]) > 0}
        return fields

    def _emit(
        self, node_ids: list[str], run: LevelRun, start: dict[str, State], ctx: RoundContext
    ) -> list[MergeResult]:
        """Each node's update for its parent after sibling mixing (tensor math on a worker)."""
        tier = self.nodes[node_ids[0]].tier
        tasks = [
            MergeTask.emitting(
                n,
                tier=tier,
                round=ctx.round,
                key=(*ctx.key, "emit"),
                state=run.cur[n],
                **self._emit_fields(n, run, start[n], folded=False),
            )
            for n in node_ids
        ]
        return ctx.runtime.merge(tasks, [])

    def _report(self, results: list[MergeResult], ctx: RoundContext) -> dict[str, Update]:
        """Each node reports its emitted update to its parent through the up channel."""
        emitted: dict[str, Update] = {}
        for res in results:
            node = self.nodes[res.node_id]
            parent = self.graph.parent(res.node_id)
            in_time = ctx.channels.edge(node.tier, self.nodes[parent].tier).report(
                ctx.times,
                rnd=ctx.round,
                child=res.node_id,
                parent=parent,
                busy_s=ctx.times.elapsed[res.node_id],
                sizes=res.emitted_sizes if res.emitted is not None else None,
                key=ctx.key,
            )
            if res.emitted is not None and in_time:
                emitted[res.node_id] = res.emitted
        return emitted
