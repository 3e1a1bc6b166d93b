"""Robust aggregators: hand-computed values, order invariance, honest range, config-time checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed.aggregators.base import AggContext
from hierfed.aggregators.robust import (
    CoordinateMedian,
    Krum,
    NormBoundedMean,
    TrimmedMean,
    check_fanouts,
)
from hierfed.errors import ConfigError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update

CTX = AggContext("global/inst-00", "institution", 1, 0)


def _upd(sender: str, vals: list[float], w: float = 1.0, comp: str = "head.t") -> Update:
    return Update.from_delta(
        {comp: {"w": torch.tensor(vals, dtype=torch.float32)}}, w, sender=sender, round=1
    )


def _est(agg, updates, comp: str = "head.t") -> torch.Tensor:
    merged, _ = agg.aggregate(updates, None, CTX)
    return merged.mean()[comp]["w"]


def test_registered_names():
    for name in ("median", "trimmed_mean", "krum", "norm_bounded"):
        assert not AGGREGATORS.get(name).associative


def test_median_hand_computed_and_preweighted():
    us = [
        _upd("a", [1.0, 10.0], 2.0),
        _upd("b", [3.0, -5.0], 1.0),
        _upd("c", [2.0, 7.0], 5.0),
        _upd("d", [100.0, 8.0], 1.0),
    ]
    merged, _ = CoordinateMedian({}).aggregate(us, None, CTX)
    # even count: mean of the two middle values; unweighted per sender
    assert torch.allclose(merged.mean()["head.t"]["w"], torch.tensor([2.5, 7.5]))
    assert merged.weights["head.t"] == 9.0  # total weight of the holders, so parents keep summing
    assert torch.allclose(merged.tensors["head.t"]["w"], torch.tensor([2.5, 7.5]) * 9.0)
    assert merged.meta.senders == ("a", "b", "c", "d")


def test_trimmed_mean_hand_computed():
    us = [_upd(s, [v]) for s, v in zip("abcde", [1.0, 2.0, 3.0, 4.0, -100.0])]
    # trim 0.2 of 5 -> drop 1 at each end: mean(1, 2, 3) = 2
    assert _est(TrimmedMean({"trim": 0.2}), us).item() == pytest.approx(2.0)
    assert _est(TrimmedMean({"trim": 0.0}), us).item() == pytest.approx(-18.0)


def test_krum_picks_central_update_and_multikrum_averages():
    us = [
        _upd("a", [0.0, 0.0]),
        _upd("b", [1.0, 0.0]),
        _upd("c", [0.0, 1.0]),
        _upd("d", [0.5, 0.5]),
        _upd("e", [50.0, 50.0]),
    ]
    # f=1: score = sum of the n-f-2 = 2 nearest squared distances; d (0.5, 0.5) is most central
    assert torch.allclose(_est(Krum({"f": 1}), us), torch.tensor([0.5, 0.5]))
    # multi-Krum m=3: d (0.5) plus the two tied next (a, b, c all score 1.0; a and b first by id)
    est = _est(Krum({"f": 1, "m": 3}), us)
    assert torch.allclose(est, torch.tensor([0.5, 0.5 / 3]))


def test_norm_bounded_mean_caps_each_sender():
    us = [_upd("a", [3.0, 4.0], 1.0), _upd("b", [0.0, 1.0], 1.0)]
    # bound 1: a scaled to (0.6, 0.8), b untouched; weighted mean of the two
    assert torch.allclose(_est(NormBoundedMean({"max_norm": 1.0}), us), torch.tensor([0.3, 0.9]))
    # adaptive: bound = median norm = (5 + 1) / 2 = 3
    assert torch.allclose(
        _est(NormBoundedMean({}), us), torch.tensor([(1.8 + 0) / 2, (2.4 + 1) / 2])
    )


def test_components_merge_only_among_holders():
    us = [_upd("a", [1.0]), _upd("b", [2.0]), _upd("c", [3.0]), _upd("c2", [9.0], comp="head.u")]
    merged, _ = CoordinateMedian({}).aggregate(us, None, CTX)
    assert merged.mean()["head.t"]["w"].item() == 2.0
    assert merged.mean()["head.u"]["w"].item() == 9.0
    assert merged.weights == {"head.t": 3.0, "head.u": 1.0}


vec = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None)
@given(
    honest=st.lists(vec, min_size=5, max_size=9),
    attackers=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=2),
    perm_seed=st.integers(0, 1000),
    name=st.sampled_from(["median", "trimmed_mean", "krum", "norm_bounded"]),
)
def test_order_invariant_and_within_honest_range(honest, attackers, perm_seed, name):
    opts = {"trim": 0.25} if name == "trimmed_mean" else ({"f": 2} if name == "krum" else {})
    agg = AGGREGATORS.get(name)(opts)
    us = [_upd(f"h{i:02d}", v, w=1.0 + i) for i, v in enumerate(honest)]
    us += [_upd(f"m{j}", [a] * 3, w=1.0) for j, a in enumerate(attackers)]
    g = torch.Generator().manual_seed(perm_seed)
    shuffled = [us[i] for i in torch.randperm(len(us), generator=g).tolist()]
    a, b = _est(agg, us), _est(agg, shuffled)
    assert torch.equal(a, b)
    if name == "norm_bounded":
        return  # bounds norms, not coordinates (checked by hand above)
    h = torch.tensor(honest)
    lo, hi = h.min(0).values, h.max(0).values
    n = len(us)
    f = len(attackers)
    if name == "trimmed_mean" and f > int(0.25 * n + 1e-9):
        return  # more attackers than trimmed: outside the rule's breakdown point
    if name == "krum":
        # Krum's guarantee is about distances, not coordinates: with attackers far outside
        # (|a| > 1000) it must pick honest updates, so the result lies in the honest box
        if n < 2 * 2 + 3 or any(abs(x) < 1000 for x in attackers):
            return
    assert bool((a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()), (a, lo, hi)


def test_option_and_fanout_checks_name_the_key(tiny_cfg):
    with pytest.raises(ConfigError, match="trim"):
        TrimmedMean.check_options({"trim": 0.5}, key="topology.tiers.institution.options")
    with pytest.raises(ConfigError, match="'topology.tiers.institution.options.f'"):
        Krum.check_options({"f": -1}, key="topology.tiers.institution.options")
    with pytest.raises(ConfigError, match="unknown|takes options"):
        Krum.check_options({"g": 1})
    cfg = tiny_cfg(
        **{
            "topology.tiers.institution.aggregator": "krum",
            "topology.tiers.institution.options.f": 1,
        }
    )
    # 3 students per institution < 2f + 3 = 5: fails when the tree is built, naming the key
    with pytest.raises(ConfigError, match=r"topology\.tiers\.institution\.options\.f.*n = 3"):
        check_fanouts(cfg, [("institution", 3)])
    check_fanouts(cfg, [("institution", 5)])
    from hierfed.simulation import run

    with pytest.raises(ConfigError, match="2f"):
        run(cfg, write=False)
