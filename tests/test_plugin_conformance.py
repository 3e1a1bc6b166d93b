"""Conformance: every registered topology honours the Topology contract on a tiny federation
(one round on the local runtime)."""

from __future__ import annotations

import math

import pytest

from hierfed import plugins  # noqa: F401
from hierfed.config import load_config
from hierfed.engine import RoundStats
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model, model_spec
from hierfed.registry import AGGREGATORS, TOPOLOGIES
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation
from hierfed.topology import Topology
from tests.conftest import play, tiny_overrides


@pytest.mark.parametrize("name", TOPOLOGIES.names())
def test_every_topology_honours_the_contract(name):
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local", "rounds": 1}), topology=name)
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    initial = model.component_state()
    topo = TOPOLOGIES.get(name)(cfg=cfg, federation=fed, spec=spec)
    assert isinstance(topo, Topology)
    topo.init(initial)
    rt = LocalRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    ledger = CommLedger()
    stats = play(topo, 1, rt, ledger).stats
    assert isinstance(stats, RoundStats)
    assert stats.participants > 0 and not stats.failures
    assert math.isfinite(stats.train_loss) and stats.sim_time_s > 0
    # bytes moved, only trainable components (the frozen backbone never travels), all in round 1
    assert ledger.total() > 0 and {r.round for r in ledger.records} == {1}
    assert set(ledger.by_component()) <= set(spec.components)
    # the global model has every component with its shape; a client's personalized model too
    for state in (topo.global_state(), topo.personalized_state(fed.clients[0].id)):
        assert set(state) == set(initial)
        for c, params in state.items():
            assert {p: tuple(t.shape) for p, t in params.items()} == {
                p: tuple(t.shape) for p, t in initial[c].items()
            }
    metrics = topo.round_metrics()
    assert isinstance(metrics, dict)
    assert topo.tier_names[0] == fed.tier_names[0]


def _conformance_updates() -> list:
    import torch

    from hierfed.update import Update

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(5):  # enough senders for every robust rule's default options (Krum: 2f + 3)
        delta = {
            "head.t": {"w": torch.randn(3, 2, generator=g)},
            "encoder.x": {"b": torch.randn(4, generator=g)},
        }
        if i == 4:
            delta.pop("encoder.x")  # one sender lacks a component
        out.append(
            Update.from_delta(
                delta,
                float(i + 1),
                sender=f"s{i}",
                round=1,
                num_samples=i + 1,
                stats={"loss": 0.5 + i},
            )
        )
    return out


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_honours_the_contract(name):
    """Finite pre-weighted output over the senders' components, weight = the holders' summed
    weight, inputs untouched, nothing in -> None out, and the state comes back usable."""
    import torch

    from hierfed.aggregators.base import AggContext

    cls = AGGREGATORS.get(name)
    agg = cls({})
    ups = _conformance_updates()
    before = [
        {c: {p: t.clone() for p, t in ps.items()} for c, ps in u.tensors.items()} for u in ups
    ]
    base = {"head.t": {"w": torch.zeros(3, 2)}, "encoder.x": {"b": torch.zeros(4)}}
    ctx = AggContext("global", "global", 1, 0, state=base)
    state = agg.init_state()
    merged, state = agg.aggregate(ups, state, ctx)
    assert merged is not None
    assert set(merged.tensors) == {"head.t", "encoder.x"}
    assert merged.weights["head.t"] == pytest.approx(15.0)
    assert merged.weights["encoder.x"] == pytest.approx(10.0)
    for c, ps in merged.tensors.items():
        for p, t in ps.items():
            assert t.shape == ups[0].tensors[c][p].shape and bool(torch.isfinite(t).all())
    for u, b in zip(ups, before):
        assert all(torch.equal(u.tensors[c][p], b[c][p]) for c in b for p in b[c])
    again, _ = agg.aggregate(ups, state, ctx)  # a second round from the returned state
    assert again is not None
    assert agg.aggregate([], state, ctx)[0] is None
