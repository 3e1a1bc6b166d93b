"""The leaf tier's work in one node-round of its parents: clients train and report.

``train``: every sampled client trains from its parent's broadcast and reports its Update
through the up channel. ``train_d2d``: semi-decentralized students, who train and mix with
their neighbours device to device (``topology.tiers.<leaf>.peer_steps > 0``) before they report.
Both return ``(sources, expectations)`` for the parents' merge: the update handles and what
each member is expected to send.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hierfed.engine.context import RoundContext
from hierfed.engine.peers import d2d_mix, leaf_graphs
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeTask, TrainJob
from hierfed.update import State, Update

if TYPE_CHECKING:
    from hierfed.engine.walk import TreeEngine


def job(
    eng: TreeEngine, c: str, *, start_from: str, tier: str, ordinal: int, ctx: RoundContext
) -> TrainJob:
    """Leaf ``c``'s training job: from the state keyed ``start_from`` in the round's handle,
    through ``tier``'s postprocess chain, keyed by its pass ``ordinal`` in the round."""
    return TrainJob(
        client_id=c,
        parent_id=start_from,
        tier=tier,
        round=ctx.round,
        key=(ctx.round, ordinal, c),
        trains=eng.trains[c],
        sends=eng.sends_up(eng.trains[c], eng.graph.leaf_level),
        local=ctx.clients.local.get(c),
        privacy=ctx.clients.privacy.get(c),
        continual=eng.continual.fit(c, ctx.round) if eng.continual is not None else None,
    )


def _expect(eng: TreeEngine, c: str, max_weight: float) -> Expectation:
    sends = eng.sends_up(eng.trains[c], eng.graph.leaf_level)
    rank = eng.spec.rank_of(eng.fed.by_id[c])  # a lower-rank client sends only its rank
    low = rank if rank < eng.spec.lora_rank else None
    return Expectation(c, frozenset(sends), exact=True, max_weight=max_weight, rank=low)


def train(
    eng: TreeEngine,
    node_ids: list[str],
    sampled: dict[str, list[str]],
    cur: dict[str, State],
    ctx: RoundContext,
) -> tuple[list[Any], dict[str, Expectation]]:
    """Sampled leaves train from their parents' states and report (clocked, recorded)."""
    ordinal = eng.ordinal(ctx.key)
    jobs: list[TrainJob] = []
    expect: dict[str, Expectation] = {}
    for n in node_ids:
        for c in sampled[n]:
            tier = eng.nodes[n].tier
            jobs.append(job(eng, c, start_from=n, tier=tier, ordinal=ordinal, ctx=ctx))
            expect[c] = _expect(eng, c, eng.nodes[c].max_weight)
    jobs.sort(key=lambda j: j.client_id)
    metas, updates = ctx.runtime.train(jobs, ctx.runtime.put({n: cur[n] for n in node_ids}))
    for m in metas:
        c = m.client_id
        if ctx.stats.failed(m):
            ctx.times.never([c])
            continue
        parent = eng.graph.parent(c)
        ctx.channels.edge(eng.nodes[c].tier, eng.nodes[parent].tier).report(
            ctx.times,
            rnd=ctx.round,
            child=c,
            parent=m.parent_id,
            busy_s=ctx.channels.training_s(c, rnd=ctx.round, key=ctx.key),
            sizes=m.sizes,
            key=ctx.key,
        )
        if ctx.stats.absorb(m, ctx.clients):
            ctx.stats.participants += 1
    for c in ctx.times.late:
        expect.pop(c, None)  # a late update is never merged (nor kept for later)
    return [updates], expect


def train_d2d(
    eng: TreeEngine,
    node_ids: list[str],
    drawn: dict[str, list[str]],
    sampled: dict[str, list[str]],
    cur: dict[str, State],
    ctx: RoundContext,
) -> tuple[list[Any], dict[str, Expectation]]:
    """Leaf gossip: one node-round of every parent in ``node_ids`` with device-to-device
    mixing among its sampled leaves.

    Repeated ``R = local_rounds`` times (of the leaf tier): every present leaf trains from
    its own state (pass ``r`` keyed as ``ordinal(key) * R + r``; its first state is the
    broadcast, so with ``R = 1`` it trains exactly as without gossip); the leaf tier's
    ``postprocess`` chain applies to that update; then the leaves of one parent mix the
    components they send up with their neighbours (``peers.d2d_mix``). Then each leaf sends
    ``state - broadcast`` with its carried weights (its training rows at first) through the
    parent tier's chain. Mixing never changes the ``w``-weighted sum the parent merges.

    Dropped-out leaves and leaves whose training failed lose their links (they neither train
    nor mix nor send from then on). Leaves of one parent move in lockstep: each pass lasts as
    long as the slowest training plus its mixing; the parent's deadline applies to the report.
    """
    d2d = eng.d2d
    if d2d is None:
        raise RuntimeError("train_d2d needs topology.tiers.<leaf>.peer_steps > 0")
    leaf = eng.tier_names[-1]
    first = eng.ordinal(ctx.key) * d2d.local_rounds
    parent = {c: n for n in node_ids for c in sampled[n]}
    shared = {c: eng.sends_up(eng.trains[c], eng.graph.leaf_level) for c in parent}
    # each leaf's own values of what it sends up, and its push-sum weight for each
    own: dict[str, State] = {c: {x: cur[parent[c]][x] for x in shared[c]} for c in parent}
    carried = {c: dict.fromkeys(shared[c], eng.nodes[c].max_weight) for c in parent}
    graphs = leaf_graphs(eng, node_ids, drawn, ctx)
    alive = set(parent)
    trained: set[str] = set()
    busy = dict.fromkeys(node_ids, 0.0)
    for r in range(d2d.local_rounds):
        pkey = (*ctx.key, "d2d", r)
        order = sorted(alive)
        handle = ctx.runtime.put({c: {**cur[parent[c]], **own[c]} for c in order})
        # each starts from its own state (the handle is keyed by leaf); the leaf tier's
        # chain applies to what leaves send each other
        jobs = [job(eng, c, start_from=c, tier=leaf, ordinal=first + r, ctx=ctx) for c in order]
        metas, updates = ctx.runtime.train(jobs, handle)
        wire, compute = _absorb_pass(metas, node_ids, parent, alive, trained, ctx, pkey)
        expect = {c: _expect(eng, c, eng.nodes[c].max_weight) for c in wire if shared[c]}
        mix_s = d2d_mix(
            eng,
            node_ids,
            drawn,
            graphs,
            alive,
            shared,
            own,
            carried,
            wire=wire if r == 0 else {},
            handle=handle,
            updates=updates,
            expect=expect,
            ctx=ctx,
            pkey=pkey,
        )
        for n in node_ids:
            busy[n] += compute[n] + mix_s[n]
    ctx.stats.participants += len(trained)
    ups = _report(eng, sorted(alive), parent, shared, own, carried, cur, busy, ctx)
    # every present student is expected (a failed one counts against the quorum, as without
    # gossip); a late one is not merged. Carried weights move between siblings, so the bound
    # on a weight is the group's rows, not the student's own.
    group_rows = {n: sum(eng.nodes[c].max_weight for c in sampled[n]) for n in node_ids}
    late = set(ctx.times.late)
    expect = {c: _expect(eng, c, group_rows[parent[c]]) for c in parent if c not in late}
    return [ups], expect


def _absorb_pass(
    metas: list[Any],
    node_ids: list[str],
    parent: dict[str, str],
    alive: set[str],
    trained: set[str],
    ctx: RoundContext,
    pkey: tuple,
) -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Fold one training pass into the round; returns the trained leaves' wire sizes and, per
    parent, its slowest leaf's training time. Failed leaves leave ``alive``."""
    wire: dict[str, dict[str, int]] = {}
    compute = dict.fromkeys(node_ids, 0.0)
    for m in metas:
        c = m.client_id
        if ctx.stats.failed(m):
            ctx.times.never([c])
            alive.discard(c)
            continue
        if not ctx.stats.absorb(m, ctx.clients):
            continue  # sits this pass out (its DP budget is spent); still mixes
        trained.add(c)
        wire[c] = m.sizes
        busy_c = ctx.channels.training_s(c, rnd=ctx.round, key=pkey)
        compute[parent[c]] = max(compute[parent[c]], busy_c)
    return wire, compute


def _report(
    eng: TreeEngine,
    alive: list[str],
    parent: dict[str, str],
    shared: dict[str, tuple[str, ...]],
    own: dict[str, State],
    carried: dict[str, dict[str, float]],
    cur: dict[str, State],
    busy: dict[str, float],
    ctx: RoundContext,
) -> dict[str, Update]:
    """Each mixed leaf's ``state - broadcast`` with its carried weights, through the parent
    tier's chain (an emitting MergeTask with nothing to merge does exactly that), reported."""
    leaf = eng.tier_names[-1]

    def report(c: str, sizes: dict[str, int] | None) -> bool:
        n = parent[c]
        return ctx.channels.edge(leaf, eng.nodes[n].tier).report(
            ctx.times, rnd=ctx.round, child=c, parent=n, busy_s=busy[n], sizes=sizes, key=ctx.key
        )

    emits = []
    for c in alive:
        n = parent[c]
        if not shared[c]:
            report(c, None)
            continue
        emits.append(
            MergeTask.emitting(
                c,
                tier=leaf,
                round=ctx.round,
                key=(*ctx.key, "d2d-report"),
                state={**cur[n], **own[c]},
                start=cur[n],
                sends=shared[c],
                emit_weights=dict(carried[c]),
                parent_id=n,
                parent_tier=eng.nodes[n].tier,
                emit_samples=int(eng.nodes[c].max_weight),  # the leaf's training rows
            )
        )
    ups: dict[str, Update] = {}
    for res in ctx.runtime.merge(emits, []):
        in_time = report(res.node_id, res.emitted_sizes if res.emitted is not None else None)
        if res.emitted is not None and in_time:
            ups[res.node_id] = res.emitted
    return ups
