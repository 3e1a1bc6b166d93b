"""Who contributed what: leave-one-out from the Update algebra, and Shapley values.

**Leave-one-out.** A merge by the weighted mean is a sum of pre-weighted shares, so removing
one sender needs no re-merge: ``merged - share`` (per component, tensors and weights) *is*
the merge of everyone else, at any tier — a student's share of its institution's merge, or
an institution's share of the global one. ``loo_influence`` measures how far the merged
mean delta moves without the sender; with a utility (say, a validation metric of
``start + mean delta``) ``loo_values`` gives ``U(all) - U(all but k)``.

**Shapley values.** ``shapley_exact`` enumerates every coalition (up to ~12 senders);
``shapley_permutations`` is the Monte Carlo permutation estimate (Castro et al., 2009; the
per-round estimator GTG-Shapley builds on) with its standard error: each sampled
permutation gives every sender one marginal contribution ``U(S + k) - U(S)``, the estimate
is their mean and the error ``std / sqrt(permutations)``. A coalition's merge is the
Update sum of its members' shares, so every utility call costs one sum and one evaluation;
evaluations are cached by coalition.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> us = [Update.from_delta({"head.t": {"w": torch.tensor([x])}}, 1.0, sender=s, round=1)
    ...       for s, x in [("a", 1.0), ("b", 3.0)]]
    >>> merged = Update.sum(us)
    >>> leave_one_out(merged, us[0]).mean()["head.t"]["w"].item()
    3.0
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hierfed.seeding import np_rng
from hierfed.update import State, Update, UpdateMeta, state_norm, state_sub

# a coalition's merged update (None: nobody) -> utility, higher is better
Utility = Callable[[Update | None], float]


def leave_one_out(merged: Update, share: Update) -> Update:
    """``merged`` without one sender's pre-weighted ``share`` (see the module doc).

    Components only ``share`` carried (weight left <= 0) are dropped; the result's senders
    are ``merged``'s minus ``share``'s. Neither input is mutated."""
    tensors: dict[str, dict[str, object]] = {}
    weights: dict[str, float] = {}
    for c, params in merged.tensors.items():
        if c not in share.tensors:
            tensors[c], weights[c] = dict(params), float(merged.weights[c])
            continue
        w = float(merged.weights[c]) - float(share.weights[c])
        # relative to the merged weight: what float rounding leaves of a sole holder's weight
        if w <= 1e-9 * max(1.0, abs(float(merged.weights[c]))):
            continue
        tensors[c] = {p: t - share.tensors[c][p] for p, t in params.items()}
        weights[c] = w
    senders = tuple(s for s in merged.meta.senders if s not in set(share.meta.senders))
    meta = UpdateMeta(
        senders, merged.meta.round, max(0, merged.meta.num_samples - share.meta.num_samples)
    )
    return Update(tensors, weights, meta)  # type: ignore[arg-type]


def loo_influence(merged: Update, shares: Sequence[Update]) -> dict[str, float]:
    """Per sender: the norm of the change of the merged mean delta when it is left out,
    over the components that keep a holder."""
    full = merged.mean()
    out: dict[str, float] = {}
    for u in shares:
        rest = leave_one_out(merged, u).mean()
        common = {c: full[c] for c in rest}
        out["|".join(u.meta.senders)] = state_norm(state_sub(common, rest))
    return dict(sorted(out.items()))


def loo_values(merged: Update, shares: Sequence[Update], utility: Utility) -> dict[str, float]:
    """Per sender: ``U(all) - U(all but the sender)``."""
    full = utility(merged)
    out = {}
    for u in shares:
        rest = leave_one_out(merged, u)
        out["|".join(u.meta.senders)] = full - utility(rest if rest.tensors else None)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class ShapleyEstimate:
    """Shapley value per sender, with its standard error (0 when computed exactly)."""

    values: Mapping[str, float]
    stderr: Mapping[str, float]
    permutations: int  # 0 = exact enumeration
    evaluations: int  # utility calls made


class _Game:
    def __init__(self, shares: Sequence[Update], utility: Utility) -> None:
        self.shares = sorted(shares, key=lambda u: u.meta.senders)
        self.names = ["|".join(u.meta.senders) for u in self.shares]
        self.utility = utility
        self.cache: dict[frozenset[int], float] = {}

    def value(self, members: frozenset[int]) -> float:
        if members not in self.cache:
            merged = Update.sum(self.shares[i] for i in sorted(members)) if members else None
            self.cache[members] = float(self.utility(merged))
        return self.cache[members]


def shapley_exact(shares: Sequence[Update], utility: Utility) -> ShapleyEstimate:
    """Exact Shapley values by enumerating all ``2^n`` coalitions (n <= 12)."""
    game = _Game(shares, utility)
    n = len(game.names)
    if n > 12:
        raise ValueError(f"{n} senders: 2^{n} coalitions; use shapley_permutations")
    vals = [0.0] * n
    for k in range(n):
        others = [i for i in range(n) if i != k]
        for size in range(n):
            coef = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in itertools.combinations(others, size):
                base = frozenset(s)
                vals[k] += coef * (game.value(base | {k}) - game.value(base))
    return ShapleyEstimate(
        dict(zip(game.names, vals)), {m: 0.0 for m in game.names}, 0, len(game.cache)
    )


def shapley_permutations(
    shares: Sequence[Update],
    utility: Utility,
    *,
    permutations: int,
    seed: int,
    key: Sequence[object] = (),
) -> ShapleyEstimate:
    """Monte Carlo Shapley values over ``permutations`` keyed random orders, with standard
    errors (see the module doc). Same ``(seed, key)``, same orders."""
    if permutations < 2:
        raise ValueError("permutations must be >= 2 (the standard error needs two draws)")
    game = _Game(shares, utility)
    n = len(game.names)
    rng = np_rng(seed, "shapley", *key)
    marg = np.zeros((permutations, n))
    for p in range(permutations):
        order = rng.permutation(n)
        members: frozenset[int] = frozenset()
        prev = game.value(members)
        for k in order:
            members = members | {int(k)}
            cur = game.value(members)
            marg[p, int(k)] = cur - prev
            prev = cur
    mean = marg.mean(0)
    se = marg.std(0, ddof=1) / math.sqrt(permutations)
    return ShapleyEstimate(
        dict(zip(game.names, mean.tolist())),
        dict(zip(game.names, se.tolist())),
        permutations,
        len(game.cache),
    )


def applied_utility(start: State, score: Callable[[State], float]) -> Utility:
    """A utility over merged updates: ``score(start + mean delta)``; nobody = ``score(start)``.

    ``score`` is, e.g., a validation metric of a rebuilt model with that state loaded."""

    def utility(merged: Update | None) -> float:
        if merged is None:
            return score(start)
        mean = merged.mean()
        state = {
            c: ({p: t + mean[c][p] for p, t in params.items()} if c in mean else params)
            for c, params in start.items()
        }
        return score(state)

    return utility


def contribution_totals(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each sender's leave-one-out influence summed over the rounds of a run's metrics records
    (``eval.contributions``); empty when no record carries ``contributions``.

    >>> contribution_totals([{"contributions": {"a": 0.5}}, {"contributions": {"a": 1.0, "b": 2.0}}])
    {'a': 1.5, 'b': 2.0}
    """
    out: dict[str, float] = {}
    for rec in metrics:
        for sender, value in sorted(rec.get("contributions", {}).items()):
            out[sender] = out.get(sender, 0.0) + float(value)
    return dict(sorted(out.items()))
