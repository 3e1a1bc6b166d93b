"""Clip a sender's (unweighted) delta to an L2 norm bound, across all its components."""

from __future__ import annotations

import math

from hierfed.errors import ConfigError
from hierfed.postprocess.base import PostContext, Postprocessor
from hierfed.registry import POSTPROCESSORS
from hierfed.update import Update, state_norm


@POSTPROCESSORS.register("clip")
class Clip(Postprocessor):
    """Scale the mean delta so its L2 norm is at most ``max_norm``; weights unchanged."""

    option_defaults = {"max_norm": 1.0}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        v = options.get("max_norm", 1.0)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{key}.max_norm", v, "must be a finite number > 0")

    def process(self, update: Update, ctx: PostContext) -> Update:
        norm = state_norm(update.mean())
        bound = float(self.options["max_norm"])
        if norm <= bound:
            return update
        scale = bound / norm
        return Update(
            {c: {p: t * scale for p, t in params.items()} for c, params in update.tensors.items()},
            dict(update.weights),
            update.meta,
        )
