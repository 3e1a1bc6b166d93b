"""Semi-decentralized trees: siblings of one tier mix with each other (device to device)
between aggregations by their parent (``topology.tiers.<tier>.peer_steps``)."""

from __future__ import annotations

import pytest
import torch

from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model, model_spec
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation
from tests.conftest import play, tiny_overrides


def _round(**extra):
    extra.setdefault("runtime.name", "local")
    cfg = load_config(None, tiny_overrides(**extra), topology="hierarchical")
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    topo = TOPOLOGIES.get("hierarchical")(cfg=cfg, federation=fed, spec=spec)
    topo.init(model.component_state())
    rt = LocalRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    ledger = CommLedger()
    stats = play(topo, 1, rt, ledger).stats
    return topo, ledger, stats


INST = ("global/inst-00", "global/inst-01", "global/inst-02")


def test_complete_peer_mixing_synchronizes_siblings_and_keeps_the_parent_mean():
    plain, plain_led, plain_stats = _round()
    peer, led, stats = _round(
        **{
            "topology.tiers.institution.peer_steps": 1,
            "topology.tiers.institution.peer_graph": "complete",
        }
    )
    e = peer.engine
    comps = [c for c in e.states[INST[0]] if c in e.states[INST[1]] and e.level_of(c) < 1]
    assert "adapter.backbone" in comps
    apart = 0.0
    for c in comps:
        for p in e.states[INST[0]][c]:
            # institutions hold the same (weighted-mean) value after mixing on the complete graph
            torch.testing.assert_close(
                e.states[INST[0]][c][p], e.states[INST[1]][c][p], atol=1e-6, rtol=1e-5
            )
            apart = max(
                apart,
                float(
                    (plain.engine.states[INST[0]][c][p] - plain.engine.states[INST[1]][c][p])
                    .abs()
                    .max()
                ),
            )
    assert apart > 1e-4  # without mixing they differ
    # mixing preserves the weighted mean the root computes: the global model is unchanged
    g0, g1 = plain.global_state(), peer.global_state()
    for c in g0:
        for p in g0[c]:
            torch.testing.assert_close(g1[c][p], g0[c][p], atol=2e-6, rtol=1e-5)
    peers = [r for r in led.records if r.direction == "peer"]
    assert {r.edge for r in peers} == {"institution<->institution"}
    assert {(r.src, r.dst) for r in peers} == {(a, b) for a in INST for b in INST if a != b}
    assert stats.sim_time_s > plain_stats.sim_time_s  # the exchanges take simulated time


def test_bad_peer_settings_are_rejected():
    with pytest.raises(ConfigError, match="peer_graph"):
        load_config(None, tiny_overrides(**{"topology.tiers.institution.peer_graph": "star"}))
    with pytest.raises(ConfigError, match="peer_steps"):
        load_config(None, tiny_overrides(**{"topology.tiers.institution.peer_steps": -1}))


def test_ring_peer_mixing_keeps_what_the_parent_merges():
    """Push-sum with carried weights: on a ring of 5 institutions of unequal size, mixing moves
    values and weights between neighbours but leaves the global merge where it is without
    mixing (the ratio form with fixed weights kept it only on the complete graph)."""
    base = {"data.num_institutions": 5}
    plain, _, _ = _round(**base)
    peer, led, _ = _round(
        **base,
        **{
            "topology.tiers.institution.peer_steps": 2,
            "topology.tiers.institution.peer_graph": "ring",
        },
    )
    insts = [n for n in peer.engine.states if n.count("/") == 1]
    comp = "adapter.backbone"
    sizes = {n: peer.engine.nodes[n].max_weight for n in insts}
    assert len(set(sizes.values())) > 1  # unequal institutions: the case fixed weights got wrong
    moved = max(
        float((peer.engine.states[n][comp][p] - plain.engine.states[n][comp][p]).abs().max())
        for n in insts
        for p in peer.engine.states[n][comp]
    )
    assert moved > 1e-4  # the institutions did mix
    root_p, root_q = plain.engine.states["global"], peer.engine.states["global"]
    for c in root_p:
        for p in root_p[c]:
            torch.testing.assert_close(root_q[c][p], root_p[c][p], atol=1e-5, rtol=1e-5)
    peer_adapter = [r for r in led.records if r.direction == "peer" and r.component == comp]
    assert len(peer_adapter) == 5 * 2 * 2  # 5 ring links, both ways, 2 steps
