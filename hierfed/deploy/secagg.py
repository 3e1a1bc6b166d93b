"""SecAgg+ on the top edge of a deployment, with Flower's ``SecAggPlusWorkflow`` and
``secaggplus_mod``: the server learns only the sum of the institutions' updates.

Each institution turns its pre-weighted Update into one flat vector in a layout the server
fixes (every component the root merges, in sorted order, zeros where it holds none, then one
weight per component), divided by a public scale ``S`` (the sum of every institution's
training rows, so values stay within the clipping range), and hands it to the mod with
``num_examples = max_weight`` (every institution weighs the same: the mean the workflow
unmasks, times the number of institutions in it, is the sum). The server rebuilds one summed
Update from the unmasked vector (``sum_update``) and merges it like the individual ones: a
weighted mean of one sum equals the weighted mean of its parts. Robust aggregators, which
need individual updates, are refused (``check_secagg``).

Exactness: Flower quantizes with stochastic rounding (numpy's global RNG on each SuperNode)
to ``2**secagg_bits`` levels over ``[-secagg_clip, secagg_clip]``, so a SecAgg+ run equals
the plain one up to that quantization (per value, at most ``n * step * S`` on the sum of ``n``
institutions, ``step = 2 * clip / 2**bits``), not bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hierfed.config import RunConfig
from hierfed.errors import ConfigError
from hierfed.update import State, Update, UpdateMeta, merge_stats

MAX_WEIGHT = 1.0  # every institution's num_examples: equal ratios, so mean * n = sum


@dataclass(frozen=True)
class Layout:
    """Where each (component, parameter) sits in the flat vector, and the public scale."""

    entries: tuple[tuple[str, str, tuple[int, ...]], ...]  # (component, param, shape)
    components: tuple[str, ...]
    scale: float

    @classmethod
    def of(cls, state: Mapping[str, Mapping[str, torch.Tensor]], scale: float) -> Layout:
        entries = tuple(
            (c, p, tuple(state[c][p].shape)) for c in sorted(state) for p in sorted(state[c])
        )
        return cls(entries, tuple(sorted(state)), float(scale))

    def to_json(self) -> str:
        return json.dumps(
            {"entries": [list(e[:2]) + [list(e[2])] for e in self.entries], "scale": self.scale}
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        d = json.loads(text)
        entries = tuple((c, p, tuple(shape)) for c, p, shape in d["entries"])
        return cls(entries, tuple(sorted({e[0] for e in entries})), float(d["scale"]))

    def flatten(self, update: Update | None) -> list[np.ndarray]:
        """An institution's Update as the arrays it masks (scaled by ``1/scale``)."""
        out = []
        for c, p, shape in self.entries:
            t = update.tensors.get(c, {}).get(p) if update is not None else None
            arr = np.zeros(shape) if t is None else t.detach().double().numpy()
            out.append(arr / self.scale)
        w = [update.weights.get(c, 0.0) if update is not None else 0.0 for c in self.components]
        out.append(np.asarray(w, dtype=np.float64) / self.scale)
        return out

    def unflatten(self, arrays: Sequence[np.ndarray], n: int) -> tuple[State, dict[str, float]]:
        """The sum of ``n`` institutions' vectors from the mean the workflow unmasked."""
        state: State = {}
        for (c, p, _), arr in zip(self.entries, arrays):
            state.setdefault(c, {})[p] = torch.from_numpy(np.asarray(arr) * n * self.scale).float()
        ws = np.asarray(arrays[len(self.entries)]) * n * self.scale
        return state, {c: float(w) for c, w in zip(self.components, ws)}


def sum_update(
    layout: Layout, arrays: Sequence[np.ndarray], heads: Mapping[str, Mapping[str, Any]], rnd: int
) -> Update:
    """One Update holding the sum of the institutions in ``heads`` (their non-secret metadata:
    sample counts and statistics), from the workflow's unmasked mean."""
    state, weights = layout.unflatten(arrays, len(heads))
    keep = [c for c, w in weights.items() if w > 1e-9]  # no institution sent it
    metas = [
        Update({}, {}, UpdateMeta((s,), rnd, int(h["num_samples"]), dict(h.get("stats", {}))))
        for s, h in sorted(heads.items())
    ]
    meta = UpdateMeta(
        tuple(sorted(heads)),
        rnd,
        sum(int(h["num_samples"]) for h in heads.values()),
        merge_stats(metas),
    )
    return Update({c: state[c] for c in keep}, {c: weights[c] for c in keep}, meta)


def check_secagg(cfg: RunConfig) -> None:
    """SecAgg+ settings that can be refused before anything starts."""
    from hierfed.registry import AGGREGATORS

    dep = cfg.deployment
    if not dep.secagg:
        return
    agg = cfg.tier("global").aggregator
    if not getattr(AGGREGATORS.get(agg), "associative", False):
        raise ConfigError(
            "topology.tiers.global.aggregator",
            agg,
            "under deployment.secagg the server sees only the sum of the institutions' "
            "updates: use an associative aggregator (weighted_mean)",
        )
    if not 8 <= dep.secagg_bits <= 28:
        raise ConfigError("deployment.secagg_bits", dep.secagg_bits, "use 8..28 (22 default)")
    if dep.secagg_clip <= 0:
        raise ConfigError("deployment.secagg_clip", dep.secagg_clip, "must be > 0")


def workflow_params(cfg: RunConfig, n: int) -> dict[str, Any]:
    """Arguments of Flower's SecAggPlusWorkflow for ``n`` institutions."""
    dep = cfg.deployment
    shares = dep.secagg_shares or n
    threshold = dep.secagg_threshold or max(2, n - 1)
    return {
        "num_shares": shares if shares > 2 else 1.0,  # Flower: 1.0 = every institution
        "reconstruction_threshold": threshold,
        "max_weight": MAX_WEIGHT,
        "clipping_range": dep.secagg_clip,
        "quantization_range": 2**dep.secagg_bits,
        "timeout": dep.round_timeout_s,
    }
