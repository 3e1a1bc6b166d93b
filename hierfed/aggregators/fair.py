"""Fairness-aware aggregators: q-FFL (q-fair federated learning) and agnostic FL.

Both need each sender's loss. It travels as metadata beside the tensors: a client puts its
mean training loss over its last local epoch in ``update.meta.stats["loss"]`` (the worker
does, hierfed/runtime/worker.py). That loss is a proxy for the loss of the round's starting
model on the sender's data (the quantity the papers use): it costs no extra pass over the
data and orders senders alike. Either rule works at any tier: a tier node's update for its
parent carries the sample-weighted mean of its accepted members' statistics over its
node-rounds (``hierfed/runtime/merge.py``), so ``topology.tiers.global.aggregator: qffl``
weighs each institution by its students' mean loss.

Neither rule is associative: each needs every sender's own delta and loss. Like the robust
rules, the estimate ``e[c]`` is returned pre-weighted by the holders' summed sample weight
``W[c]``, so a parent tier keeps weighting this node by population.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> from hierfed.aggregators.base import AggContext
    >>> us = [Update.from_delta({"head.t": {"w": torch.tensor([x])}}, 1.0, sender=s,
    ...                         round=0, stats={"loss": f})
    ...       for s, x, f in [("a", 1.0, 1.0), ("b", 4.0, 3.0)]]
    >>> merged, _ = QFFL({"q": 1.0, "lipschitz": 0.0}).aggregate(us, None, AggContext("n", "t", 0, 0))
    >>> merged.mean()["head.t"]["w"].item()  # (1*1 + 3*4) / (1 + 3): the lossier sender counts more
    3.25
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.errors import ConfigError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update

__all__ = ["AgnosticFL", "ContributionWeighted", "QFFL", "project_simplex", "sender_loss"]

_LOSS_FLOOR = 1e-10  # F**(q-1) at F = 0 would be infinite


def sender_loss(update: Update, node_id: str) -> float:
    """The ``loss`` statistic an update carries; a missing or non-finite one is an error
    naming the sender (clients and tier nodes always send it, so this means a foreign
    sender, or a tier node whose members sent none)."""
    loss = update.meta.stats.get("loss")
    who = ",".join(update.meta.senders) or "?"
    if loss is None or not math.isfinite(float(loss)):
        raise ValueError(
            f"{node_id}: update from {who} carries no finite 'loss' statistic "
            f"(got {loss!r}); fairness-aware aggregators need meta.stats['loss'], which clients "
            "and tier nodes send: use a sender that reports its loss"
        )
    return max(float(loss), _LOSS_FLOOR)


def _number(key: str, v: Any, *, low: float, fix: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < low:
        raise ConfigError(key, v, fix)


def _sq_norm(update: Update) -> float:
    """Squared norm of the sender's mean delta over every component it carries."""
    return sum(
        float((t / update.weights[c]).double().pow(2).sum())
        for c, params in update.tensors.items()
        if update.weights[c] > 0
        for t in params.values()
    )


def _scaled(update: Update, factor: float) -> Update:
    return Update(
        {c: {p: t * factor for p, t in ps.items()} for c, ps in update.tensors.items()},
        dict(update.weights),
        update.meta,
    )


def _quotient(
    scaled: Sequence[Update], denom: Mapping[str, float], weight: Mapping[str, float]
) -> Update:
    """``sum(scaled)[c] / denom[c]``, pre-weighted again by ``weight[c]`` (the holders' summed
    sample weight); a component whose ``denom`` is not > 0 is left out."""
    total = Update.sum(scaled)
    assert total is not None
    factors = {c: weight[c] / denom[c] for c in denom if denom[c] > 0}
    return Update(
        {
            c: {p: t * factors[c] for p, t in ps.items()}
            for c, ps in total.tensors.items()
            if c in factors
        },
        {c: weight[c] for c in total.tensors if c in factors},
        total.meta,
    )


def _scalar_weighted(terms: Iterable[tuple[Update, float, float]]) -> Update:
    """``e[c] = sum_k a_k U_k[c] / sum_k h_k W_k[c]`` over the terms ``(U_k, a_k, h_k)`` (``U_k``
    pre-weighted, ``W_k[c]`` its weight on ``c``, over its holders), returned pre-weighted
    by ``sum_k W_k[c]``: q-FFL's step (``a = F^q``, ``h`` adds the step-size term) and the
    contribution-weighted mean (``a = h`` = the sender's scale). ``a == 1`` sums ``U_k``
    itself, so unit scales give Update.sum's bits."""
    scaled: list[Update] = []
    denom: dict[str, float] = {}
    weight: dict[str, float] = {}
    for u, a, h in terms:
        scaled.append(u if a == 1.0 else _scaled(u, a))
        for c, w in u.weights.items():
            if w > 0:
                denom[c] = denom.get(c, 0.0) + float(w) * h
                weight[c] = weight.get(c, 0.0) + float(w)
    return _quotient(scaled, denom, weight)


def _sorted_senders(updates: Sequence[Update]) -> list[Update]:
    """The updates in sender order, so that float sums do not depend on arrival order."""
    return sorted(updates, key=lambda u: u.meta.senders)


class _PerSenderScores(Aggregator):
    """A rule whose state is one number per sender it has seen (AFL's mixture weight,
    ContributionWeighted's reputation): empty at first, handed to ``merge`` as a private
    copy, and kept in sender order."""

    associative = False

    def init_state(self) -> dict[str, float]:
        return {}

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        if not updates:
            return None, state
        merged, scores = self.merge(_sorted_senders(updates), dict(state or {}), ctx)
        return merged, dict(sorted(scores.items()))

    @abstractmethod
    def merge(
        self, ordered: list[Update], scores: dict[str, float], ctx: AggContext
    ) -> tuple[Update, dict[str, float]]:
        """Merge ``ordered`` (non-empty, sender order); returns the merge and the new scores
        (``scores`` may be changed in place: it is the rule's own copy)."""


@AGGREGATORS.register("qffl")
class QFFL(Aggregator):
    """q-FFL's q-FedAvg step (Li, Sanjabi, Beirami and Smith, ICLR 2020), sample-weighted.

    Sender ``k`` with sample weight ``p_k``, mean delta ``d_k`` (over a component) and loss
    ``F_k``; ``L`` is the Lipschitz estimate of the gradient (1 / the clients' learning rate
    in the paper)::

        e[c] = sum_k p_k F_k^q d_k[c]  /  sum_k p_k (F_k^q + q L F_k^(q-1) |d_k|^2)

    (sums over the holders of ``c``; ``|d_k|`` over every component the sender carries).
    ``q = 0`` is FedAvg's weighted mean, bit for bit; larger ``q`` gives lossier senders
    more say. Options: ``q`` (>= 0, default 1) and ``lipschitz`` (``L`` >= 0, default 100 =
    1 / the default ``train.lr``; 0 drops the step-size term).
    """

    associative = False
    option_defaults = {"q": 1.0, "lipschitz": 100.0}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        super().check_options(options, key)
        _number(f"{key}.q", options.get("q", 1.0), low=0, fix="a number >= 0 (0 = FedAvg)")
        _number(
            f"{key}.lipschitz",
            options.get("lipschitz", 100.0),
            low=0,
            fix="a number >= 0 (about 1 / train.lr; 0 drops the step-size term)",
        )

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        if not updates:
            return None, state
        q, lip = float(self.options["q"]), float(self.options["lipschitz"])

        def term(u: Update) -> tuple[Update, float, float]:
            f = sender_loss(u, ctx.node_id)
            fq = f**q  # exactly 1.0 when q == 0: the sum is then Update.sum's, bit for bit
            return u, fq, fq + (q * lip * f ** (q - 1) * _sq_norm(u) if q > 0 and lip > 0 else 0.0)

        return _scalar_weighted(term(u) for u in _sorted_senders(updates)), state


def project_simplex(v: Sequence[float]) -> list[float]:
    """Euclidean projection of ``v`` onto the probability simplex (sort-based, exact)."""
    if not v:
        return []
    u = sorted(v, reverse=True)
    cum, theta = 0.0, 0.0
    for i, x in enumerate(u, start=1):
        cum += x
        t = (cum - 1.0) / i
        if x - t > 0:
            theta = t
    return [max(x - theta, 0.0) for x in v]


@AGGREGATORS.register("afl")
class AgnosticFL(_PerSenderScores):
    """Agnostic federated learning (Mohri, Sivek and Suresh, ICML 2019): minimise the loss
    of the worst mixture of senders, by projected gradient ascent on the mixture weights.

    State: a mixture weight ``lam[s]`` per sender this node has seen (uniform at first; a
    newcomer enters at the mean of the others). Each round, among the senders present,
    ``pi_k = lam_k / sum lam`` and per component (over its holders)
    ``e[c] = sum_k pi_k d_k[c] / sum_k pi_k``; then ``lam_k += step * F_k`` for the senders
    present and ``lam`` is projected back onto the simplex. Senders with high loss gain
    weight round after round. ``step = 0`` is the unweighted mean of the senders' deltas.
    Option ``step`` (>= 0, default 0.05).
    """

    option_defaults = {"step": 0.05}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        super().check_options(options, key)
        _number(f"{key}.step", options.get("step", 0.05), low=0, fix="a number >= 0")

    def merge(
        self, ordered: list[Update], lam: dict[str, float], ctx: AggContext
    ) -> tuple[Update, dict[str, float]]:
        names = ["|".join(u.meta.senders) for u in ordered]
        fresh = [s for s in names if s not in lam]
        if fresh:
            base = sum(lam.values()) / len(lam) if lam else 1.0
            lam.update({s: base for s in fresh})
            total_l = sum(lam.values())
            lam = {s: v / total_l for s, v in lam.items()}
        here = sum(lam[s] for s in names)
        pis = {s: (lam[s] / here if here > 0 else 1.0 / len(names)) for s in names}
        scaled: list[Update] = []
        denom: dict[str, float] = {}
        weight: dict[str, float] = {}
        for s, u in zip(names, ordered):
            # pi_k times the sender's mean delta: rescale its pre-weighted tensors per component
            tensors = {
                c: {p: t * (pis[s] / float(u.weights[c])) for p, t in ps.items()}
                for c, ps in u.tensors.items()
                if u.weights[c] > 0
            }
            scaled.append(Update(tensors, {c: pis[s] for c in tensors}, u.meta))
            for c in tensors:
                denom[c] = denom.get(c, 0.0) + pis[s]
                weight[c] = weight.get(c, 0.0) + float(u.weights[c])
        merged = _quotient(scaled, denom, weight)
        step = float(self.options["step"])
        if step > 0:
            for s, u in zip(names, ordered):
                lam[s] += step * sender_loss(u, ctx.node_id)
            keys = sorted(lam)
            lam = dict(zip(keys, project_simplex([lam[k] for k in keys])))
        return merged, lam


def _flat_mean(update: Update, comps: Sequence[str]) -> torch.Tensor:
    return torch.cat(
        [
            (update.tensors[c][p] / float(update.weights[c])).reshape(-1).double()
            for c in comps
            for p in sorted(update.tensors[c])
        ]
    )


@AGGREGATORS.register("contribution_weighted")
class ContributionWeighted(_PerSenderScores):
    """Weights senders by their running contribution score (cosine-gradient Shapley
    approximation in the spirit of CGSV, Xu et al., NeurIPS 2021).

    Each round, sender ``k``'s contribution is the cosine between its mean delta and the
    weighted mean of everyone else's — the merge minus its own pre-weighted share
    (``hierfed.explain.contribution.leave_one_out``), over the components both carry; a lone
    sender scores 1. Its reputation is the running mean ``r = decay * r + (1 - decay) *
    cos`` (a newcomer starts at its first score), kept in the state (so checkpointed: a
    per-sender contribution record). The merge is the weighted mean with each sender's
    weight scaled by ``max(r, 0)``: senders whose updates keep pointing against everyone
    else's stop counting. A component whose holders all score <= 0 falls back to the plain
    weighted mean. Option ``decay`` in [0, 1) (default 0.5; 0 = this round's scores only).
    """

    option_defaults = {"decay": 0.5}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        super().check_options(options, key)
        v = options.get("decay", 0.5)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0 <= v < 1):
            raise ConfigError(f"{key}.decay", v, "a number in [0, 1) (0 = this round only)")

    def merge(
        self, ordered: list[Update], rep: dict[str, float], ctx: AggContext
    ) -> tuple[Update, dict[str, float]]:
        from hierfed.explain.contribution import leave_one_out

        full = Update.sum(ordered)
        assert full is not None
        decay = float(self.options["decay"])
        scale: dict[str, float] = {}
        names = ["|".join(u.meta.senders) for u in ordered]
        for u, name in zip(ordered, names):
            rest = leave_one_out(full, u)
            comps = sorted(
                c
                for c in u.tensors
                if u.weights[c] > 0 and c in rest.tensors and rest.weights[c] > 0
            )
            score = 1.0
            if comps:
                a, b = _flat_mean(u, comps), _flat_mean(rest, comps)
                na, nb = float(a.norm()), float(b.norm())
                score = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
            rep[name] = decay * rep[name] + (1 - decay) * score if name in rep else score
            scale[name] = max(rep[name], 0.0)
        merged = _scalar_weighted((u, scale[n], scale[n]) for u, n in zip(ordered, names))
        held = {c for u in ordered for c, w in u.weights.items() if w > 0}
        stuck = held - set(merged.weights)  # every holder scored <= 0: the plain weighted mean
        if stuck:
            plain = full.restrict(stuck)
            merged = Update(
                {**merged.tensors, **plain.tensors},
                {**merged.weights, **plain.weights},
                merged.meta,
            )
        return merged, rep
