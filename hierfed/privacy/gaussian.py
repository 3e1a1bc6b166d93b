"""``gaussian``: client-level DP on a tier edge — clip the sender's update, add Gaussian noise.

Put it in a tier's ``postprocess`` list; every sender into that tier (a student into
``institution``, an institution into ``global``) then sends its mean delta clipped to L2 norm
``clip`` plus ``N(0, (noise_multiplier * clip)^2)`` per coordinate, drawn from a generator keyed
by ``(seed, round, sender)`` — reproducible whatever worker runs it. The weight is unchanged.

The privacy unit is the sending node; ``client_level_report`` (accountant.py) composes the
per-round releases with the tier's sampling rate into an epsilon stated with its unit and
``delta``. NaN/Inf are rejected *before* clipping (a non-finite norm would otherwise scale the
whole update to NaN and hide the fault). The noise here is local to each sender (each update
is private on its own); its variance is known to the receiver (noise-aware aggregation).

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> from hierfed.postprocess.base import PostContext
    >>> u = Update.from_delta({"head.t": {"w": torch.tensor([3.0, 4.0])}}, 2.0, sender="s", round=1)
    >>> g = GaussianMechanism({"clip": 1.0, "noise_multiplier": 0.0})
    >>> round(float(g.process(u, PostContext("s", "p", "institution", 1, 0)).mean()["head.t"]["w"].norm()), 4)
    1.0
"""

from __future__ import annotations

import math

import torch

from hierfed.errors import ConfigError, UpdateRejected
from hierfed.postprocess.base import PostContext, Postprocessor
from hierfed.registry import POSTPROCESSORS
from hierfed.seeding import torch_gen
from hierfed.update import Update, state_norm


def _finite_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@POSTPROCESSORS.register("gaussian")
class GaussianMechanism(Postprocessor):
    """Clip to ``clip``, add noise of std ``noise_multiplier * clip``; ``delta`` is for the report."""

    option_defaults = {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        c = options.get("clip", 1.0)
        if not _finite_number(c) or c <= 0:
            raise ConfigError(
                f"{key}.clip", c, "must be a finite number > 0 (L2 bound of a sender's update)"
            )
        s = options.get("noise_multiplier", 1.0)
        if not _finite_number(s) or s < 0:
            raise ConfigError(
                f"{key}.noise_multiplier", s, "must be a finite number >= 0 (noise std / clip)"
            )
        d = options.get("delta", 1e-5)
        if not _finite_number(d) or not (0 < d < 1):
            raise ConfigError(f"{key}.delta", d, "must lie strictly between 0 and 1 (e.g. 1e-5)")

    @property
    def noise_std(self) -> float:
        """Std of the noise added to each coordinate of the mean delta."""
        return float(self.options["noise_multiplier"]) * float(self.options["clip"])

    def process(self, update: Update, ctx: PostContext) -> Update:
        for c, ps in update.tensors.items():
            for p, t in ps.items():
                if not bool(torch.isfinite(t).all()):
                    raise UpdateRejected(
                        ctx.sender, f"{c}/{p}: contains NaN or Inf (rejected before clipping)"
                    )
        mean = update.mean()
        norm = state_norm(mean)
        bound = float(self.options["clip"])
        scale = 1.0 if norm <= bound else bound / norm
        std = self.noise_std
        g = torch_gen(ctx.seed, "gaussian", ctx.round, ctx.sender, ctx.tier)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for c in sorted(update.tensors):
            w = update.weights[c]
            if c not in mean:  # zero weight: nothing to privatize
                tensors[c] = dict(update.tensors[c])
                continue
            out = {}
            for p in sorted(update.tensors[c]):
                d = mean[c][p] * scale
                if std > 0:
                    d = d + torch.randn(d.shape, generator=g, dtype=torch.float32).to(d.dtype) * std
                out[p] = d * w
            tensors[c] = out
        return Update(tensors, dict(update.weights), update.meta)
