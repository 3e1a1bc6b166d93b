"""``noise_aware``: weight each sender's update by the inverse of its noise variance.

Institutions under different privacy regulations send updates with different amounts of DP
noise; a plain weighted mean lets the noisiest drown the rest. For independent noise of
per-coordinate variance ``v_i`` on sender ``i``'s mean delta, the minimum-variance unbiased
combination weights it by ``1 / v_i``; with the sample weight ``w_i`` kept as a prior this is

    estimate[c] = sum_i (w_i / (v_i + tau2)) d_i[c] / sum_i (w_i / (v_i + tau2))

``tau2`` (option, >= 0) is the spread of the senders' *true* deltas: with ``tau2 = 0`` only
noise counts; a large ``tau2`` turns the rule back into the plain weighted mean, which it also
is whenever all ``v_i`` are equal. With ``auto_tau2: true`` it is estimated each node-round
(DerSimonian-Laird, as in random-effects meta-analysis): non-IID senders differ in more than
their noise, and ignoring that (``tau2 = 0``) drops the noisiest senders' data almost entirely. The result is pre-weighted with the senders' total sample
weight, so parents keep summing.

Where ``v_i`` comes from (option ``variances``):

* known from the policy — a map ``{sender-id glob: variance}`` (first match wins), e.g. from
  ``hierfed.privacy.policy.update_noise_variance`` (DP-SGD with plain SGD: steps x (lr sigma
  C / B)^2) or ``(noise_multiplier x clip)^2`` for the ``gaussian`` postprocessor;
* estimated — senders no glob matches get ``v_i = mean_j (d_ij - median_{k != i} d_kj)^2`` over
  the coordinates of the component: the squared distance to the others' coordinate-wise median, which is
  dominated by the noise when the noise is large (it also absorbs true heterogeneity, so it
  is conservative for outlying senders).

Not associative (weights depend on the whole set of senders).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import torch

from hierfed.aggregators.robust import RobustAggregator, _median
from hierfed.errors import ConfigError
from hierfed.options import finite_nonneg
from hierfed.registry import AGGREGATORS


@AGGREGATORS.register("noise_aware")
class NoiseAwareMean(RobustAggregator):
    """Inverse-noise-variance weighted mean, per component, among the holders."""

    option_defaults = {"variances": {}, "tau2": 0.0, "auto_tau2": False, "floor": 1e-12}

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        var = options.get("variances", {})
        if not isinstance(var, Mapping):
            raise ConfigError(
                f"{key}.variances",
                var,
                "must map sender-id globs to variances, e.g. {'global/inst-00/*': 0.01}",
            )
        for pat, v in var.items():
            if not finite_nonneg(v):
                raise ConfigError(f"{key}.variances.{pat}", v, "must be a finite variance >= 0")
        if not isinstance(options.get("auto_tau2", False), bool):
            raise ConfigError(f"{key}.auto_tau2", options["auto_tau2"], "must be true or false")
        for k in ("tau2", "floor"):
            v = options.get(k, cls.option_defaults[k])
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ConfigError(f"{key}.{k}", v, "must be a finite number >= 0")

    def known_variance(self, sender: str) -> float | None:
        for pat, v in dict(self.options["variances"]).items():
            if fnmatch.fnmatchcase(sender, pat):
                return float(v)
        return None

    def estimate(self, x, w, c, ctx, senders=()):
        holders = list(senders) if len(senders) == x.shape[0] else [None] * x.shape[0]
        n = x.shape[0]
        v = []
        for i, s in enumerate(holders):
            known = self.known_variance(s) if s is not None else None
            if known is None:
                # distance to the median of the *others*: a sender never sets its own yardstick
                others = x[torch.arange(n) != i] if n > 1 else x
                known = float((x[i] - _median(others)).pow(2).mean())
            v.append(known)
        noise = torch.tensor(v, dtype=torch.float64) + float(self.options["floor"])
        tau2 = float(self.options["tau2"])
        if self.options["auto_tau2"] and n > 1:
            tau2 = max(tau2, self.between_variance(x, noise))
        var = noise + tau2
        eff = w / var
        return (eff.unsqueeze(1) * x).sum(0) / eff.sum()

    @staticmethod
    def between_variance(x: torch.Tensor, noise: torch.Tensor) -> float:
        """DerSimonian-Laird moment estimate of the per-coordinate spread of the true deltas:
        with ``a_i = 1 / v_i``, ``Q = sum_i a_i |x_i - xbar_a|^2 / d`` and
        ``tau2 = max(0, (Q - (k - 1)) / (sum a - sum a^2 / sum a))``."""
        a = 1.0 / noise
        xbar = (a.unsqueeze(1) * x).sum(0) / a.sum()
        q = float((a * (x - xbar).pow(2).mean(1)).sum())
        denom = float(a.sum() - a.pow(2).sum() / a.sum())
        k = x.shape[0]
        return max(0.0, (q - (k - 1)) / denom) if denom > 0 else 0.0
