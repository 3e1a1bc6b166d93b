"""Noise-aware aggregation: inverse-variance weights, hand-computed; estimated variances."""

from __future__ import annotations

import pytest
import torch

from hierfed.aggregators.base import AggContext
from hierfed.aggregators.mean import WeightedMean
from hierfed.aggregators.noise_aware import NoiseAwareMean
from hierfed.errors import ConfigError
from hierfed.privacy.policy import DPPlan, update_noise_variance
from hierfed.update import Update

CTX = AggContext("global", "global", 1, 0)


def _upd(sender: str, vals, w: float = 1.0) -> Update:
    return Update.from_delta(
        {"head.t": {"w": torch.as_tensor(vals, dtype=torch.float32)}}, w, sender=sender, round=1
    )


def _est(agg, us):
    merged, _ = agg.aggregate(us, None, CTX)
    return merged, merged.mean()["head.t"]["w"]


def test_known_variances_hand_computed():
    us = [_upd("global/inst-00", [0.0], 1.0), _upd("global/inst-01", [10.0], 3.0)]
    agg = NoiseAwareMean({"variances": {"global/inst-00": 1.0, "global/inst-01": 4.0}})
    merged, est = _est(agg, us)
    # weights w/v: 1/1 and 3/4 -> (0 * 1 + 10 * 0.75) / 1.75
    assert est.item() == pytest.approx(7.5 / 1.75)
    assert merged.weights["head.t"] == 4.0  # pre-weighted with the total sample weight
    # tau2 large -> the plain weighted mean (7.5)
    _, est2 = _est(NoiseAwareMean({"variances": {"global/*": 1.0}, "tau2": 1e9}), us)
    assert est2.item() == pytest.approx(7.5, rel=1e-6)


def test_equal_variances_give_the_weighted_mean():
    us = [_upd(f"s{i}", [float(i), -float(i)], 1.0 + i) for i in range(4)]
    _, est = _est(NoiseAwareMean({"variances": {"*": 0.3}}), us)
    ref, _ = WeightedMean({}).aggregate(us, None, CTX)
    assert torch.allclose(est, ref.mean()["head.t"]["w"], atol=1e-6)


def test_estimated_variances_down_weight_the_noisy_sender():
    g = torch.Generator().manual_seed(0)
    d = 2000
    us = [_upd(f"quiet{i}", 1.0 + 0.01 * torch.randn(d, generator=g), 1.0) for i in range(3)]
    us.append(_upd("loud", 1.0 + 3.0 * torch.randn(d, generator=g), 1.0))
    _, est = _est(NoiseAwareMean({}), us)
    _, plain = _est(WeightedMean({}), us)
    err, err_plain = float((est - 1).pow(2).mean()), float((plain - 1).pow(2).mean())
    assert err < 0.01 * err_plain


def test_options_are_checked():
    with pytest.raises(ConfigError, match="variances.g"):
        NoiseAwareMean.check_options({"variances": {"g": -1.0}})
    with pytest.raises(ConfigError, match="tau2"):
        NoiseAwareMean.check_options({"tau2": float("nan")})


def test_policy_noise_variance_formula():
    plan = DPPlan(
        "p",
        1.0,
        1e-5,
        clip_norm=0.5,
        noise_multiplier=2.0,
        sample_rate=0.25,
        steps_per_round=8,
        planned_rounds=3,
    )
    # B = 0.25 x 40 = 10; steps x (lr sigma C / B)^2 = 8 x (0.1 x 2 x 0.5 / 10)^2
    assert update_noise_variance(plan, lr=0.1, num_rows=40) == pytest.approx(8 * (0.01) ** 2)


def test_auto_tau2_estimates_the_true_spread():
    # 4 senders, true deltas spread with variance 1 per coordinate, noise variance 0.01 known:
    # the moment estimate recovers tau2 ~ 1, so weights become near-equal (weighted mean)
    g = torch.Generator().manual_seed(1)
    d = 4000
    truth = [torch.randn(d, generator=g) for _ in range(4)]
    us = [_upd(f"s{i}", t + 0.1 * torch.randn(d, generator=g), 1.0) for i, t in enumerate(truth)]
    x = torch.stack([u.mean()["head.t"]["w"].double() for u in us])
    tau2 = NoiseAwareMean.between_variance(x, torch.full((4,), 0.01, dtype=torch.float64))
    assert tau2 == pytest.approx(1.0, rel=0.1)
    var = {"s0": 0.01, "s1": 0.01, "s2": 0.01, "s3": 1.0}
    _, plain = _est(WeightedMean({}), us)
    _, auto = _est(NoiseAwareMean({"variances": var, "auto_tau2": True}), us)
    _, fixed = _est(NoiseAwareMean({"variances": var}), us)
    # with tau2 estimated, s3's extra noise matters less: closer to the plain mean than tau2 = 0
    assert float((auto - plain).abs().mean()) < float((fixed - plain).abs().mean())
