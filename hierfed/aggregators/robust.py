"""Byzantine-robust aggregators: coordinate median, trimmed mean, Krum / multi-Krum, norm-bounded mean.

None of them is associative: each needs every sender's own delta, so a tier node running one
must receive its children's updates unsummed (the tree engine does exactly that). Each works
component by component, among the senders that carry the component, on the senders' *mean*
deltas ``u.tensors[c] / u.weights[c]``. The robust estimate ``e[c]`` is returned pre-weighted
like any Update — ``tensors[c] = e[c] * W[c]`` with ``W[c]`` the summed weight of all holders —
so a parent tier keeps summing and weighting by population as usual.

Median, trimmed mean and Krum treat senders equally (one sender, one vote): a sample-weighted
robust statistic would let an attacker buy influence by claiming many samples. The
norm-bounded mean keeps sample weights, since bounding the norm already caps the damage.

Requirements on the number of senders (e.g. Krum's ``n >= 2f + 3``) are checked when the tree
is built, from each node's planned fan-out (participation x children): ``check_fanouts``.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> from hierfed.aggregators.base import AggContext
    >>> us = [Update.from_delta({"head.t": {"w": torch.tensor([x])}}, 1.0, sender=f"s{i}", round=0)
    ...       for i, x in enumerate([1.0, 2.0, 100.0])]
    >>> merged, _ = CoordinateMedian({}).aggregate(us, None, AggContext("n", "institution", 0, 0))
    >>> merged.mean()["head.t"]["w"].item()
    2.0
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.errors import ConfigError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update, UpdateMeta

log = logging.getLogger(__name__)

__all__ = [
    "CoordinateMedian",
    "Krum",
    "NormBoundedMean",
    "RobustAggregator",
    "TrimmedMean",
    "check_fanouts",
]


def _flat(update: Update, c: str, names: Sequence[str]) -> torch.Tensor:
    # the mean is divided in float64 (a float32 weight of 1e-200 is 0) and kept in the update's
    # dtype, as Update.mean: the same bits as before for weights the dtype holds exactly
    w = float(update.weights[c])
    return torch.cat(
        [
            (t.double() / w).to(t.dtype).reshape(-1).double()
            for t in (update.tensors[c][p] for p in names)
        ]
    )


def _unflat(
    vec: torch.Tensor, like: Mapping[str, torch.Tensor], names: Sequence[str], scale: float
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    i = 0
    for p in names:
        t = like[p]
        out[p] = (vec[i : i + t.numel()] * scale).reshape(t.shape).to(t.dtype)
        i += t.numel()
    return out


def _merged_meta(updates: Sequence[Update]) -> UpdateMeta:
    senders = sorted({s for u in updates for s in u.meta.senders})
    return UpdateMeta(
        tuple(senders), max(u.meta.round for u in updates), sum(u.meta.num_samples for u in updates)
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class RobustAggregator(Aggregator):
    """Base of the per-component robust rules: ``estimate(X, w, ctx)`` on a [senders, d] matrix.

    Rows of ``X`` are the senders' mean deltas in sorted sender order; ``w`` their weights;
    ``senders`` their ids (the first sender of each update).
    """

    associative = False

    def estimate(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        c: str,
        ctx: AggContext,
        senders: tuple[str, ...] = (),
    ) -> torch.Tensor:
        """The robust mean delta of component ``c`` from rows ``x`` (sent by ``senders``)."""
        raise NotImplementedError

    @classmethod
    def check_fanout(cls, options: Mapping[str, Any], n: int, key: str) -> None:
        """Raise ConfigError if a node receiving ``n`` updates per round cannot run this rule."""

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        if not updates:
            return None, state
        ordered = sorted(updates, key=lambda u: u.meta.senders)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        weights: dict[str, float] = {}
        comps = sorted({c for u in ordered for c in u.tensors})
        for c in comps:
            holders = [u for u in ordered if c in u.tensors and u.weights[c] > 0]
            if not holders:
                continue
            names = sorted(holders[0].tensors[c])
            x = torch.stack([_flat(u, c, names) for u in holders])
            w = torch.tensor([float(u.weights[c]) for u in holders], dtype=torch.float64)
            senders = tuple(u.meta.senders[0] if u.meta.senders else "" for u in holders)
            est = self.estimate(x, w, c, ctx, senders)
            total = float(w.sum())
            tensors[c] = _unflat(est, holders[0].tensors[c], names, total)
            weights[c] = total
        return Update(tensors, weights, _merged_meta(ordered)), state


def _median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median; the mean of the two middle values when the count is even."""
    s, _ = torch.sort(x, dim=0)
    n = s.shape[0]
    if n % 2:
        return s[n // 2]
    return 0.5 * (s[n // 2 - 1] + s[n // 2])


@AGGREGATORS.register("median")
class CoordinateMedian(RobustAggregator):
    """Coordinate-wise median of the senders' mean deltas (Yin et al., 2018).

    Breakdown point 1/2: with fewer than half the senders malicious, every coordinate of the
    result lies between the smallest and the largest honest value.
    """

    def estimate(self, x, w, c, ctx, senders=()):
        return _median(x)


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(RobustAggregator):
    """Coordinate-wise trimmed mean: drop the ``k = floor(trim * n)`` largest and smallest
    values of each coordinate, average the rest (Yin et al., 2018). Tolerates up to ``k``
    malicious senders. Option ``trim`` in [0, 0.5)."""

    option_defaults = {"trim": 0.2}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        v = options.get("trim", 0.2)
        if not _is_number(v) or not (0 <= v < 0.5):
            raise ConfigError(
                f"{key}.trim", v, "must be a fraction in [0, 0.5) of updates cut at each end"
            )

    @classmethod
    def check_fanout(cls, options, n, key):
        trim = float(options.get("trim", 0.2))
        if trim > 0 and math.floor(trim * n + 1e-9) == 0:
            need = math.ceil(1 / trim - 1e-9)
            raise ConfigError(
                f"{key}.trim",
                options.get("trim", 0.2),
                f"trims floor(trim x n) = 0 updates at each end when this tier's nodes receive "
                f"n = {n} (participation x children), so it would be a plain mean; raise trim to "
                f">= {1 / n:.3g}, sample >= {need} children, or use median",
            )

    def estimate(self, x, w, c, ctx, senders=()):
        n = x.shape[0]
        k = int(math.floor(float(self.options["trim"]) * n + 1e-9))
        if n - 2 * k <= 0:
            return _median(x)
        s, _ = torch.sort(x, dim=0)
        return s[k : n - k].mean(0)


@AGGREGATORS.register("krum")
class Krum(RobustAggregator):
    """Krum / multi-Krum (Blanchard et al., 2017): score each sender by the summed squared
    distance to its ``n - f - 2`` nearest others, keep the ``m`` lowest scores, average them.

    Options: ``f`` (malicious senders tolerated), ``m`` (1 = Krum; more = multi-Krum).
    Needs ``n >= 2f + 3``: checked at tree build from the planned fan-out; a component that
    reaches a node with fewer holders (rejections, components only some clients hold) falls
    back to the coordinate median for that component. Ties go to the lower sender id.
    """

    option_defaults = {"f": 1, "m": 1}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        f, m = options.get("f", 1), options.get("m", 1)
        if not isinstance(f, int) or isinstance(f, bool) or f < 0:
            raise ConfigError(
                f"{key}.f", f, "must be an integer >= 0 (malicious senders tolerated)"
            )
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ConfigError(
                f"{key}.m", m, "must be an integer >= 1 (1 = Krum, more = multi-Krum)"
            )

    @classmethod
    def check_fanout(cls, options, n, key):
        f, m = int(options.get("f", 1)), int(options.get("m", 1))
        if n < 2 * f + 3:
            raise ConfigError(
                f"{key}.f",
                f,
                f"Krum needs n >= 2f + 3 updates per node-round but this tier's nodes receive n = {n} "
                f"(participation x children); lower f to <= {max(0, (n - 3) // 2)} or sample more children",
            )
        if m > n - f:
            raise ConfigError(
                f"{key}.m", m, f"multi-Krum keeps at most n - f = {n - f} updates here; lower m"
            )

    def estimate(self, x, w, c, ctx, senders=()):
        n = x.shape[0]
        f, m = int(self.options["f"]), int(self.options["m"])
        if n < 2 * f + 3:
            log.debug(
                "%s: component %s has %d holders < 2f+3; coordinate median instead",
                ctx.node_id,
                c,
                n,
            )
            return _median(x)
        d2 = torch.cdist(x, x).pow(2)
        k = n - f - 2
        scores = torch.stack(
            [torch.sort(d2[i][torch.arange(n) != i]).values[:k].sum() for i in range(n)]
        )
        # stable: equal scores keep sender order
        order = sorted(range(n), key=lambda i: (float(scores[i]), i))
        keep = order[: min(m, n - f)]
        return x[keep].mean(0)


@AGGREGATORS.register("norm_bounded")
class NormBoundedMean(RobustAggregator):
    """Weighted mean after bounding every sender's delta norm (Sun et al., 2019).

    The norm is taken over all the components a sender carries. Options: ``max_norm`` (a
    fixed bound; 0 = adaptive) and ``factor`` (adaptive bound = factor x the median sender
    norm of this node-round). Sample weights are kept.
    """

    option_defaults = {"max_norm": 0.0, "factor": 1.0}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        v = options.get("max_norm", 0.0)
        if not _is_number(v) or v < 0:
            raise ConfigError(
                f"{key}.max_norm", v, "must be a finite number >= 0 (0 = adaptive bound)"
            )
        f = options.get("factor", 1.0)
        if not _is_number(f) or f <= 0:
            raise ConfigError(f"{key}.factor", f, "must be a finite number > 0")

    def aggregate(self, updates, state, ctx):
        if not updates:
            return None, state
        ordered = sorted(updates, key=lambda u: u.meta.senders)
        norms = []
        for u in ordered:
            sq = sum(
                float((t.double() / u.weights[c]).to(t.dtype).double().pow(2).sum())
                for c, ps in u.tensors.items()
                if u.weights[c] > 0
                for t in ps.values()
            )
            norms.append(math.sqrt(sq))
        bound = float(self.options["max_norm"])
        if bound <= 0:
            bound = float(self.options["factor"]) * float(
                _median(torch.tensor(norms, dtype=torch.float64).unsqueeze(1))[0]
            )
        scaled = []
        for u, nrm in zip(ordered, norms):
            s = 1.0 if nrm <= bound or nrm == 0 else bound / nrm
            scaled.append(
                Update(
                    {c: {p: t * s for p, t in ps.items()} for c, ps in u.tensors.items()},
                    dict(u.weights),
                    u.meta,
                )
            )
        return Update.sum(scaled), state


def check_fanouts(cfg: Any, nodes: Iterable[tuple[str, int]]) -> None:
    """Check every aggregating node's planned fan-out against its tier's aggregator.

    ``nodes``: (tier name, number of children) per aggregating node. The planned fan-out is
    ``max(1, ceil(participation x children))`` as the tree engine samples. Called once when
    the tree is built, so a rule that cannot work fails before any training starts.
    """
    for tier, kids in sorted(set(nodes)):
        tcfg = cfg.tier(tier)
        cls = AGGREGATORS.get(tcfg.aggregator)
        check = getattr(cls, "check_fanout", None)
        if check is None:
            continue
        n = min(kids, max(1, int(math.ceil(tcfg.participation * kids - 1e-9))))
        key = (
            f"topology.tiers.{tier}.options"
            if tier in cfg.topology.tiers
            else "topology.default.options"
        )
        check(dict(tcfg.options), n, key)
