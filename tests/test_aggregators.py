"""Aggregators and server optimizers, by hand on two or three clients."""

from __future__ import annotations

import pytest
import torch

from hierfed.aggregators import AggContext, FedAdam, FedAvgM, ServerSGD, WeightedMean
from hierfed.config import TierConfig
from hierfed.errors import ConfigError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update

CTX = AggContext("global", "global", 1, 0)


def upd(sender, value, w, comp="head.t"):
    return Update.from_delta({comp: {"w": torch.tensor([value])}}, w, sender=sender, round=1)


def test_weighted_mean_merges_each_component_among_its_holders():
    ups = [upd("a", 1.0, 1.0), upd("b", 4.0, 2.0), upd("c", 10.0, 5.0, comp="encoder.x")]
    merged, state = WeightedMean({}).aggregate(ups, None, CTX)
    assert state is None
    mean = merged.mean()
    assert mean["head.t"]["w"].item() == pytest.approx(3.0)  # (1*1 + 4*2) / 3
    assert mean["encoder.x"]["w"].item() == pytest.approx(10.0)  # only c holds it
    assert merged.weights == {"head.t": 3.0, "encoder.x": 5.0}
    assert WeightedMean.associative


def test_unknown_aggregator_lists_the_known_ones():
    from hierfed.errors import RegistryError

    with pytest.raises(RegistryError, match="known: .*weighted_mean"):
        AGGREGATORS.get("weighted_maen")


def test_unknown_aggregator_option_is_a_config_error():
    with pytest.raises(ConfigError, match="takes options"):
        WeightedMean({"beta": 1})


def test_server_sgd_and_momentum_by_hand():
    x = {"head.t": {"w": torch.tensor([1.0])}}
    d = {"head.t": {"w": torch.tensor([0.5])}}
    new, _ = ServerSGD(TierConfig(server_lr=2.0)).step(x, d, None)
    assert new["head.t"]["w"].item() == pytest.approx(2.0)
    opt = FedAvgM(TierConfig(server_lr=1.0, server_momentum=0.5))
    x1, s1 = opt.step(x, d, None)  # m = 0.5
    x2, s2 = opt.step(x1, d, s1)  # m = 0.5*0.5 + 0.5 = 0.75
    assert x1["head.t"]["w"].item() == pytest.approx(1.5)
    assert x2["head.t"]["w"].item() == pytest.approx(2.25)
    assert s1["m"]["head.t/w"].item() == pytest.approx(0.5)  # state returned, not mutated
    assert x["head.t"]["w"].item() == 1.0


def test_fedadam_first_step_by_hand():
    tier = TierConfig(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x = {"head.t": {"w": torch.tensor([0.0], dtype=torch.float64)}}
    d = {"head.t": {"w": torch.tensor([2.0], dtype=torch.float64)}}
    new, st = FedAdam(tier).step(x, d, None)
    m = 0.1 * 2.0
    v = 0.99 * 1e-6 + 0.01 * 4.0
    assert new["head.t"]["w"].item() == pytest.approx(0.1 * m / (v**0.5 + 1e-3))
    assert st["v"]["head.t/w"].item() == pytest.approx(v)
