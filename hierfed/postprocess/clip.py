"""Clip a sender's (unweighted) delta to an L2 norm bound, across all its components.

Option ``side``: ``sender`` (default) clips in the sender's chain, which bounds honest
senders only: a malicious one skips it. ``receiver`` clips each incoming update at the
receiving node, after validation and before merging, where a sender cannot skip it;
``both`` does both (the second is then a no-op for honest senders).
"""

from __future__ import annotations

import math

from hierfed.errors import ConfigError
from hierfed.postprocess.base import PostContext, Postprocessor
from hierfed.registry import POSTPROCESSORS
from hierfed.update import Update, state_norm

SIDES = ("sender", "receiver", "both")


def clip_update(update: Update, bound: float) -> Update:
    """``update`` with its mean delta scaled to L2 norm <= ``bound`` (weights unchanged).

    The norm is taken over every component's mean ``tensors / weight``, in float64."""
    sq = 0.0
    for c, params in update.tensors.items():
        w = float(update.weights[c])
        if w > 0:
            sq += sum(float((t.double() / w).pow(2).sum()) for t in params.values())
    norm = math.sqrt(sq)
    if norm <= bound:
        return update
    return _scaled(update, bound / norm)


def _scaled(update: Update, scale: float) -> Update:
    """``update`` with every pre-weighted tensor times ``scale`` (weights and meta kept)."""
    return Update(
        {c: {p: t * scale for p, t in params.items()} for c, params in update.tensors.items()},
        dict(update.weights),
        update.meta,
    )


@POSTPROCESSORS.register("clip")
class Clip(Postprocessor):
    """Scale the mean delta so its L2 norm is at most ``max_norm``; weights unchanged."""

    option_defaults = {"max_norm": 1.0, "side": "sender"}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        v = options.get("max_norm", 1.0)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{key}.max_norm", v, "must be a finite number > 0")
        side = options.get("side", "sender")
        if side not in SIDES:
            raise ConfigError(f"{key}.side", side, f"known: {', '.join(SIDES)}")

    def process(self, update: Update, ctx: PostContext) -> Update:
        if self.options["side"] == "receiver":
            return update
        norm = state_norm(update.mean())
        bound = float(self.options["max_norm"])
        if norm <= bound:
            return update
        return _scaled(update, bound / norm)

    def receive(self, update: Update, ctx: PostContext) -> Update:
        if self.options["side"] == "sender":
            return update
        return clip_update(update, float(self.options["max_norm"]))
