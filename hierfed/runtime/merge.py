"""One node-round of a tier node: validate, clip on receipt, aggregate, check, server step.

``merge_node_round`` is a plain function of its inputs (a WorkerCore calls it; tests call it
with a hand-made spec). Every input is validated on its own (``validate_update``); the
receiving tier's receiver-side steps run on each accepted update (e.g. ``clip`` with
``side: receiver``). Then the *results* are checked too, since a sum of valid inputs can
still overflow:

* the aggregator raising, or returning a merged update whose weights are not finite and
  positive or whose mean delta holds NaN or Inf,
* the server optimizer raising, or the node's new state holding NaN or Inf,

each rejects the whole node-round: the node keeps its state (and aggregator and optimizer
states), merges nothing, and the rejection is recorded under the node's own id with the
reason — never a crash, never a non-finite model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from hierfed.aggregators.base import AggContext
from hierfed.config import RunConfig
from hierfed.errors import UpdateRejected
from hierfed.explain.contribution import loo_influence
from hierfed.model.spec import ModelSpec
from hierfed.postprocess.base import (
    PostContext,
    apply_chain,
    apply_deliver,
    apply_receive,
    build_chain,
)
from hierfed.postprocess.validate import validate_update
from hierfed.registry import AGGREGATORS, SERVER_OPTIMIZERS
from hierfed.runtime.jobs import MergeResult, MergeTask
from hierfed.secagg.edge import secure_sum
from hierfed.secagg.protocol import SecAggFailure
from hierfed.update import State, Update, first_nonfinite, merge_stats, state_sub

log = logging.getLogger(__name__)


class NodeRoundRejected(Exception):
    """Internal: the node-round's result failed a check (the reason is the message)."""


def check_merged(merged: Update) -> State:
    """The merged update's mean delta, if every weight is finite and positive and every mean
    value finite (computed in float64, cast back); else NodeRoundRejected."""
    mean: State = {}
    for c, params in merged.tensors.items():
        w = merged.weights.get(c)
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise NodeRoundRejected(f"merged weight of {c} is {w!r}")
        if w == 0:
            continue
        mean[c] = {p: (t.double() / w).to(t.dtype) for p, t in params.items()}
    bad = first_nonfinite(mean)
    if bad is not None:
        raise NodeRoundRejected(f"the merged update overflows (NaN or Inf in {bad})")
    return mean


def _accept(
    task: MergeTask,
    pool: Mapping[str, Update],
    spec: ModelSpec,
    cfg: RunConfig,
    memory: dict[str, State],
) -> tuple[list[Update], list[tuple[str, str]]]:
    """Validated (and receiver-side processed) updates, and the rejected senders' reasons.
    A stateful step (top-k) delivers each accepted update with its sender's ``memory``
    (updated in place: sender -> memory after this send)."""
    tier = cfg.tier(task.tier)
    chain = build_chain(tier.postprocess, tier.postprocess_options)
    stateful = any(pp.stateful for pp in chain)
    accepted: list[Update] = []
    rejected: list[tuple[str, str]] = []
    for exp in task.expectations:
        upd = pool.get(exp.sender)
        if upd is None:
            continue  # failed or sent nothing; the driver knows why
        try:
            if getattr(getattr(upd, "meta", None), "round", None) != task.round:
                # a late update never lands in a later round
                rnd = getattr(getattr(upd, "meta", None), "round", "?")
                raise UpdateRejected(
                    exp.sender, f"stale update from round {rnd} in round {task.round}"
                )
            validate_update(upd, exp, spec, like=task.state)
            ctx = PostContext(exp.sender, task.node_id, task.tier, task.round, cfg.seed, exp.rank)
            if stateful:
                upd, mem = apply_deliver(chain, upd, ctx, task.memory.get(exp.sender))
                if mem is not None:
                    memory[exp.sender] = mem
            accepted.append(apply_receive(chain, upd, ctx))
        except UpdateRejected as rej:
            log.warning("round %d, %s: %s", task.round, task.node_id, rej)
            rejected.append((exp.sender, rej.reason))
    return accepted, rejected


def _step(
    task: MergeTask, accepted: list[Update], cfg: RunConfig
) -> tuple[State, Any, Any, dict[str, float]]:
    """Aggregate and apply the server step; NodeRoundRejected if anything fails a check."""
    tier = cfg.tier(task.tier)
    state, agg_state, opt_state = task.state, task.agg_state, task.opt_state
    try:
        aggregator = AGGREGATORS.get(tier.aggregator)(dict(tier.options))
        if len(accepted) < aggregator.min_updates():
            return state, agg_state, opt_state, {}
        ctx = AggContext(task.node_id, task.tier, task.round, cfg.seed, state=task.state)
        agg_state = aggregator.init_state() if agg_state is None else agg_state
        merged, agg_state = aggregator.aggregate(accepted, agg_state, ctx)
    except NodeRoundRejected:
        raise
    except Exception as exc:  # a rule's failure is this node-round's, not the run's
        raise NodeRoundRejected(
            f"aggregator '{tier.aggregator}' failed: {type(exc).__name__}: {exc}"
        ) from None
    if merged is None:
        return state, agg_state, opt_state, {}
    mean = check_merged(merged)
    weights = {c: float(w) for c, w in merged.weights.items() if w > 0}
    try:
        opt = SERVER_OPTIMIZERS.get(tier.server_optimizer)(tier)
        new, opt_state = opt.step(state, merged.mean(), opt_state)
    except Exception as exc:
        raise NodeRoundRejected(
            f"server optimizer '{tier.server_optimizer}' failed: {type(exc).__name__}: {exc}"
        ) from None
    bad = first_nonfinite({c: new[c] for c in mean if c in new})
    if bad is not None:
        raise NodeRoundRejected(f"the new state overflows (NaN or Inf in {bad})")
    return new, agg_state, opt_state, weights


def _emit(
    task: MergeTask,
    state: State,
    accepted: list[Update],
    cfg: RunConfig,
    weights: Mapping[str, float],
) -> tuple[Update | None, dict[str, int]]:
    """The node's update for its parent on its last local round (through the parent's chain).

    A folded emit (``task.emit_prior``) leaves with the last merge: its weights are the mean
    of the earlier node-rounds' merged weights and this one's (``weights``)."""
    if not task.emit or task.start is None:
        return None, {}
    emit_weights, emit_samples = task.emit_weights, task.emit_samples
    history = list(task.emit_stats)
    if task.emit_prior is not None:
        emit_weights = _mean_weights(task, weights)
        emit_samples += sum(u.meta.num_samples for u in accepted)
        history.append((sum(u.meta.num_samples for u in accepted), merge_stats(accepted)))
    sends = [c for c in task.sends if emit_weights.get(c, 0) > 0]
    if not sends:
        return None, {}
    delta = state_sub({c: state[c] for c in sends}, task.start)
    emitted = Update.from_delta(
        delta,
        {c: emit_weights[c] for c in sends},
        sender=task.node_id,
        round=task.round,
        num_samples=emit_samples or sum(u.meta.num_samples for u in accepted),
        stats=combine_stats(history),
    )
    ptier = cfg.tier(task.parent_tier)
    chain = build_chain(ptier.postprocess, ptier.postprocess_options)
    ctx = PostContext(task.node_id, task.parent_id, task.parent_tier, task.round, cfg.seed)
    return apply_chain(chain, emitted, ctx)


def merge_node_round(
    task: MergeTask, pool: Mapping[str, Update], *, cfg: RunConfig, spec: ModelSpec
) -> MergeResult:
    """Run one node-round (see the module docstring); ``pool`` maps sender -> update and is
    not mutated (simulated attacks are applied by the caller before)."""
    memory: dict[str, State] = {}
    accepted, rejected = _accept(task, pool, spec, cfg, memory)
    merge_in, secagg = accepted, None
    try:
        merge_in, accepted, secagg = _secure(task, accepted, cfg)
    except SecAggFailure as why:
        reason = f"node-round rejected, nothing merged: secure aggregation failed: {why}"
        log.warning("round %d, %s: %s", task.round, task.node_id, reason)
        rejected.append((task.node_id, reason))
        merge_in, accepted = [], []
    try:
        state, agg_state, opt_state, weights = _step(task, merge_in, cfg)
    except NodeRoundRejected as why:
        reason = f"node-round rejected, nothing merged: {why}"
        log.warning("round %d, %s: %s", task.round, task.node_id, reason)
        rejected.append((task.node_id, reason))
        state, agg_state, opt_state, weights = task.state, task.agg_state, task.opt_state, {}
        accepted = []
    emitted, sizes = _emit(task, state, accepted, cfg, weights)
    contributions: dict[str, float] = {}
    mean = Update.sum(accepted) if cfg.eval.contributions and weights else None
    if mean is not None:
        # influence on the weighted mean of the accepted updates: the merge itself for an
        # associative rule, the mean a robust or fair rule replaces otherwise
        contributions = loo_influence(mean, accepted)
    return MergeResult(
        task.node_id,
        state,
        agg_state,
        opt_state,
        weights,
        tuple(u.meta.senders[0] for u in accepted),
        tuple(rejected),
        sum(u.meta.num_samples for u in accepted),
        emitted,
        sizes,
        merge_stats(accepted),
        contributions,
        memory,
        secagg,
    )


def _secure(
    task: MergeTask, accepted: list[Update], cfg: RunConfig
) -> tuple[list[Update], list[Update], Any]:
    """Under ``secure_aggregation``: the accepted updates summed through SecAgg+ (what the
    aggregator merges: one update), the ones that survived, and the protocol's report."""
    tier = cfg.tier(task.tier)
    if tier.secure_aggregation == "none" or not accepted:
        return accepted, accepted, None
    opts = dict(tier.secure_aggregation_options)
    scale = float(opts.get("max_weight") or 0.0) or max(e.max_weight for e in task.expectations)
    summed, survivors, report, _ = secure_sum(
        accepted,
        like=task.state,
        components=sorted({c for e in task.expectations for c in e.components}),
        scale=scale,
        opts=opts,
        seed=cfg.seed,
        key=(task.round, *task.key),
        node=task.node_id,
        bounds={e.sender: e.max_weight for e in task.expectations},
    )
    return ([summed] if summed is not None else []), survivors, report


def combine_stats(history: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """A node's statistics over its node-rounds from each one's ``(samples, merged stats)``:
    per name every merging node-round carries, the mean weighted by samples (a plain mean
    when none counts samples), so it equals ``merge_stats`` of all their accepted updates.
    Node-rounds that merged nothing (no samples, no stats) do not count."""
    rounds = [(float(n), s) for n, s in history if n > 0 or s]
    if not rounds:
        return {}
    names = set(rounds[0][1]).intersection(*(s for _, s in rounds[1:]))
    total = sum(n for n, _ in rounds)
    if total <= 0:
        rounds, total = [(1.0, s) for _, s in rounds], float(len(rounds))
    return {k: sum(n * float(s[k]) for n, s in rounds) / total for k in sorted(names)}


def _mean_weights(task: MergeTask, merged: Mapping[str, float]) -> dict[str, float]:
    """A folded emit's weight per component: the mean merged weight over the node's
    ``local_rounds`` node-rounds (the earlier ones from the task, this one from ``merged``),
    summed in node-round order; components with no weight are not sent."""
    prior = task.emit_prior or {}
    out = {}
    for c in task.sends:
        total = sum([*prior.get(c, ()), merged.get(c, 0.0)])
        if total > 0:
            out[c] = total / task.local_rounds
    return out
