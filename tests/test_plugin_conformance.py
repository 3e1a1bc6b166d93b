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
from hierfed.registry import TOPOLOGIES
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
