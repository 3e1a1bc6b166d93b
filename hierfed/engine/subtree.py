"""One node's subtree run elsewhere: the top edge of a tree crossing organisations.

In a deployment (``hierfed.deploy``) every child of the root (an institution) runs its own
parent-round on its own machine, and the root only sees what each sends up. Two engines split
the simulated ``TreeEngine`` along that edge, so that together they compute what it computes:

* ``SubtreeEngine`` (at an institution) runs ``run_subtree``: one parent-round of one child of
  the root, from the components the root broadcast, and hands back what the child would have
  reported (``SubtreeReply``) instead of reporting it through a channel.
* ``RemoteChildrenEngine`` (at the root) runs the root's node-round as usual but asks
  ``dispatch`` for its children's parent-rounds, then reports their replies through the top
  edge's Channel (ledger, clock, deadline), exactly where the simulated walk does.

Every draw below the root is keyed by (seed, round, key, node id), so a subtree run on its own
reproduces its part of the simulated round; the children's parent-rounds are independent of
each other (level-synchronous batching changes no result).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hierfed.engine.context import RoundContext
from hierfed.engine.stats import RoundStats, quorum_failure
from hierfed.engine.walk import TreeEngine
from hierfed.errors import NodeFailure
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeResult
from hierfed.update import State, Update


@dataclass(frozen=True)
class SubtreeReply:
    """What one child of the root sends up after its parent-round, and the round's statistics
    of its subtree (counts, sums, ids: never a member's update or data)."""

    node_id: str
    # the pre-weighted update for the root (None: nothing to send, or, under secure
    # aggregation, its part of a sum that another reply carries: ``update.meta.senders``)
    update: Update | None
    sizes: dict[str, int]  # what it sent up, per component (after the edge's postprocessors)
    elapsed_s: float  # simulated seconds its parent-round took (before sending up)
    participants: int = 0
    loss_sum: float = 0.0
    loss_rows: int = 0
    failures: tuple[tuple[str, str], ...] = ()
    rejections: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()
    late: tuple[str, ...] = ()
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)
    contributions: dict[str, float] = field(default_factory=dict)
    # what the root sent it beyond its broadcast (a secure-aggregation protocol's messages)
    down_sizes: dict[str, int] = field(default_factory=dict)

    def fold_into(self, stats: RoundStats) -> None:
        """Add the subtree's statistics to the root's round (as the simulated walk would)."""
        stats.participants += self.participants
        stats.loss_sum += self.loss_sum
        stats.loss_rows += self.loss_rows
        stats.failures += list(self.failures)
        stats.rejections += list(self.rejections)
        stats.dropped += list(self.dropped)
        stats.privacy.update(self.privacy)
        stats.contributed(self.contributions)


class SubtreeEngine(TreeEngine):
    """A TreeEngine that runs one child of the root at a time and keeps its report."""

    captured: dict[str, MergeResult]

    def _report(self, results: list[MergeResult], ctx: RoundContext) -> dict[str, Update]:
        # the report crosses the top edge elsewhere (hierfed.deploy): keep it, send nothing
        self.captured = {r.node_id: r for r in results}
        return {}

    def run_subtree(self, node: str, above: State, ctx: RoundContext) -> SubtreeReply:
        """One parent-round of ``node`` (a child of the root) from ``above``, the components
        the root broadcast; ``ctx`` carries the root's round and node-round key. ``node``'s
        state, aggregator and optimizer states advance as in the simulated walk."""
        if self.nodes[node].parent != self.root:
            raise ValueError(f"'{node}' is not a child of the root '{self.root}'")
        level = self.nodes[node].level
        own = self.states[node]
        missing = sorted(c for c in own if self.level_of(c) < level and c not in above)
        if missing:
            raise ValueError(f"the root's broadcast to '{node}' lacks components {missing}")
        start = self.take_from_parent({**own, **above}, own, level)
        self.captured = {}
        self._run_level([node], {node: start}, ctx)
        res = self.captured[node]
        st = ctx.stats
        return SubtreeReply(
            node_id=node,
            update=res.emitted,
            sizes=dict(res.emitted_sizes) if res.emitted is not None else {},
            elapsed_s=ctx.times.elapsed[node],
            participants=st.participants,
            loss_sum=st.loss_sum,
            loss_rows=st.loss_rows,
            failures=tuple(st.failures),
            rejections=tuple(st.rejections),
            dropped=tuple(st.dropped),
            late=tuple(ctx.times.late),
            privacy=dict(st.privacy),
            contributions=dict(st.contributions),
        )


#: relative slack on the weight bound of a securely aggregated sum (its weights are quantized)
SUM_SLACK = 1e-3

#: (round, node-round key, child -> the components the root broadcast to it) ->
#: child -> its reply, or a one-line reason it failed
Dispatch = Callable[[int, tuple, Mapping[str, State]], Mapping[str, "SubtreeReply | str"]]


class RemoteChildrenEngine(TreeEngine):
    """The root's TreeEngine whose children run their parent-rounds through ``dispatch``."""

    dispatch: Dispatch | None = None

    def _run_level(
        self, node_ids: list[str], start: dict[str, State], ctx: RoundContext
    ) -> dict[str, Update]:
        level = self.nodes[node_ids[0]].level
        if level != 1 or self.dispatch is None:
            return super()._run_level(node_ids, start, ctx)
        above = {n: {c: v for c, v in start[n].items() if self.level_of(c) < 1} for n in node_ids}
        replies = self.dispatch(ctx.round, ctx.key, above)
        failed: dict[str, str] = {}
        for n in node_ids:  # every subtree's statistics first, as the level-synchronous walk
            r = replies.get(n, "no reply")
            if isinstance(r, SubtreeReply):
                r.fold_into(ctx.stats)
                ctx.times.late += list(r.late)
                ctx.times.elapsed[n] = r.elapsed_s
            else:
                failed[n] = r
        emitted: dict[str, Update] = {}
        for n in node_ids:
            if n in failed:
                ctx.stats.failures.append((n, failed[n]))
                ctx.times.never([n])
                continue
            r = replies[n]
            assert isinstance(r, SubtreeReply)
            in_time = ctx.channels.edge(self.nodes[n].tier, self.nodes[self.root].tier).report(
                ctx.times,
                rnd=ctx.round,
                child=n,
                parent=self.root,
                busy_s=r.elapsed_s,
                sizes=r.sizes or None,
                key=ctx.key,
            )
            if r.down_sizes:  # the server's protocol messages to it (SecAgg+ stages)
                ctx.channels.edge(self.nodes[n].tier, self.nodes[self.root].tier).protocol(
                    rnd=ctx.round, src=self.root, dst=n, direction="down", sizes=r.down_sizes
                )
            if r.update is not None and in_time:
                emitted[n] = r.update
        if failed:  # a child that never answered counts against the root's quorum
            quorum = self.cfg.tier(self.tier_names[0]).quorum
            why = quorum_failure(set(node_ids), len(node_ids) - len(failed), quorum, ctx.stats)
            if why is not None:
                raise NodeFailure(self.root, ctx.round, why)
        return emitted

    def _inner_members(
        self, sampled: dict[str, list[str]], run: Any, ctx: RoundContext
    ) -> tuple[list[Any], dict[str, Expectation]]:
        sources, expect = super()._inner_members(sampled, run, ctx)
        ups = sources[0]
        for c, e in list(expect.items()):
            senders = ups[c].meta.senders
            if len(senders) > 1:  # a secure sum: bounded by all of its senders together,
                # with room for its quantization (SecAgg+ unmasks a quantized sum)
                bound = sum(self.nodes[s].max_weight for s in senders if s in self.nodes)
                expect[c] = replace(e, max_weight=bound * (1 + SUM_SLACK))
        return sources, expect


def with_engine(topo: Any, engine_cls: type[TreeEngine]) -> Any:
    """``topo`` (a TreeTopology, before ``init``) with its engine rebuilt as ``engine_cls``."""
    old: TreeEngine = topo.engine
    topo.engine = engine_cls(
        cfg=old.cfg, federation=old.fed, spec=old.spec, graph=old.graph, clients=topo.clients
    )
    return topo
