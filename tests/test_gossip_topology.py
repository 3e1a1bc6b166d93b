"""The ``gossip`` topology on the local runtime: FedAvg equivalence, mean preservation,
ledger counts, metrics, and the errors a bad graph raises."""

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


def _cfg(topology="gossip", **extra):
    extra.setdefault("runtime.name", "local")
    # no local-scope components, full clients only: every component is shared
    return load_config(None, tiny_overrides(**extra), topology=topology)


def _topology(cfg):
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    topo = TOPOLOGIES.get(cfg.topology.name)(cfg=cfg, federation=fed, spec=spec)
    topo.init(model.component_state())
    return topo, fed


def _round(cfg, rounds=1):
    topo, fed = _topology(cfg)
    rt = LocalRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    ledger = CommLedger()
    stats = [play(topo, r, rt, ledger).stats for r in range(1, rounds + 1)]
    return topo, ledger, stats


def _close(a, b, **kw):
    for p in a:
        torch.testing.assert_close(a[p], b[p], **kw)


def test_complete_graph_one_step_equals_sample_weighted_fedavg():
    """Definition: with ``weighting: samples`` every node ends the round at
    x0 + sum_i n_i delta_i[c] / sum_i n_i over the clients that train c — star FedAvg's
    (weighted_mean, server_lr=1) global model, component by component."""
    star, _, _ = _round(_cfg("star"))
    fedavg = star.global_state()
    gossip, _, _ = _round(
        _cfg(**{"topology.options.graph": "complete", "topology.options.steps": 1})
    )
    checked = 0
    for n, state in gossip.states.items():
        for c in gossip.shared[n]:
            _close(state[c], fedavg[c], atol=2e-6, rtol=1e-5)
            checked += 1
    assert checked > 20
    # the plain (uniform) mean differs when clients have different sizes: the test discriminates
    uni, _, _ = _round(
        _cfg(**{"topology.options.graph": "complete", "topology.options.weighting": "uniform"})
    )
    n0 = uni.nodes[0]
    diffs = [
        float((uni.states[n0][c][p] - fedavg[c][p]).abs().max())
        for c in uni.shared[n0]
        for p in fedavg[c]
    ]
    assert max(diffs) > 1e-4


def test_ring_mixing_preserves_the_mean_of_the_half_steps():
    """Uniform weighting on a ring: the mean over nodes equals every node's value on the
    complete graph (the mean of the trained half-steps), for components all nodes share."""
    ring, _, _ = _round(
        _cfg(**{"topology.options.weighting": "uniform", "topology.options.steps": 3})
    )
    comp, _, _ = _round(
        _cfg(**{"topology.options.weighting": "uniform", "topology.options.graph": "complete"})
    )
    everyone = [c for c in ring.labels if len(ring.labels[c]) == len(ring.nodes)]
    assert "adapter.backbone" in everyone
    some_node_moved = False
    for c in everyone:
        for p in ring.states[ring.nodes[0]][c]:
            stack = torch.stack([ring.states[n][c][p].double() for n in ring.nodes])
            torch.testing.assert_close(
                stack.mean(0), comp.states[comp.nodes[0]][c][p].double(), atol=1e-6, rtol=1e-5
            )
            some_node_moved |= bool((stack[0] - stack.mean(0)).abs().max() > 1e-6)
    assert some_node_moved  # a ring with 3 steps is not yet at consensus


def test_ledger_counts_every_neighbour_exchange():
    topo, ledger, _ = _round(_cfg(**{"topology.options.steps": 2}))
    n = len(topo.nodes)
    # a ring of n nodes: n links, both directions, every step; all nodes share the adapters
    assert topo.round_metrics()["gossip_exchanges"] == 2 * 2 * n
    peer = [r for r in ledger.records if r.direction == "peer"]
    assert {(r.src, r.dst) for r in peer} == {
        (a, b)
        for a in topo.nodes
        for b in topo.nodes
        if a != b and abs(topo.nodes.index(a) - topo.nodes.index(b)) in (1, n - 1)
    }
    assert set(ledger.by_edge()) == {"student<->student"}
    # adapter bytes: one record per exchange
    adapter = [r for r in peer if r.component == "adapter.backbone"]
    assert len(adapter) == 2 * 2 * n


def test_link_failures_and_dropouts_are_keyed_and_cut_exchanges():
    over = {"topology.options.link_failure": 0.5, "topology.default.dropout": 0.3}
    a, la, sa = _round(_cfg(**over))
    b, lb, sb = _round(_cfg(**over))
    assert la.records == lb.records
    assert a.round_metrics()["online_nodes"] == b.round_metrics()["online_nodes"] < len(a.nodes)
    assert a.round_metrics()["gossip_exchanges"] < 2 * len(a.nodes)
    for n in a.nodes:
        for c, params in a.states[n].items():
            _close(params, b.states[n][c], atol=0, rtol=0)


def test_round_metrics_report_consensus_and_node_quality():
    topo, _, stats = _round(
        _cfg(**{"topology.options.time_varying": True, "topology.options.graph": "erdos_renyi"})
    )
    m = topo.round_metrics()
    assert m["consensus_distance"] > 0
    assert set(m["node_metric_mean"]) == {"digit", "dropout_risk", "essay_grade", "essay_topic"}
    for t, worst in m["node_metric_worst"].items():
        assert worst <= m["node_metric_mean"][t] + 1e-12
    assert m["nodes_evaluated"] == len(topo.nodes)
    # on the complete graph one step reaches consensus: the distance discriminates
    full, _, _ = _round(_cfg(**{"topology.options.graph": "complete"}))
    assert full.round_metrics()["consensus_distance"] < 1e-5 < m["consensus_distance"]
    assert stats[0].sim_time_s > 0 and stats[0].participants == len(topo.nodes)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {
                "topology.options.graph": "edges",
                "topology.options.edges": "[[global/inst-00/student-000,global/inst-00/student-001]]",
            },
            "disconnected",
        ),
        (
            {
                "topology.options.graph": "edges",
                "topology.options.edges": "[[global/inst-00/student-000,global/inst-00/student-000]]",
            },
            "self-loops",
        ),
        (
            {
                "topology.options.graph": "edges",
                "topology.options.edges": "[[global/inst-00/student-000,nobody]]",
            },
            "not a node",
        ),
        ({"topology.options.graph": "hypercube"}, "known graphs"),
        ({"topology.options.stepz": 2}, "gossip takes options"),
        ({"topology.options.graph": "random_regular", "topology.options.degree": 20}, "degree"),
        # leaf gossip between aggregations belongs to trees; here it would be silently ignored
        ({"topology.tiers.student.peer_steps": 1}, "topology.options.steps"),
    ],
)
def test_bad_graphs_are_rejected_before_any_work(options, match):
    cfg = _cfg(**options)
    with pytest.raises(ConfigError, match=match):
        _topology(cfg)


def test_late_gossip_nodes_mix_their_old_state_not_their_update():
    """With a deadline nobody meets, every trained update is discarded: round 1 then only mixes
    the (identical) starting states, so every node still holds the initial values."""
    topo, ledger, stats = _round(_cfg(**{"topology.default.deadline_s": 1e-6}))
    assert sorted(stats[0].late) == topo.nodes and stats[0].participants == len(topo.nodes)
    assert stats[0].sim_time_s >= 1e-6
    for n in topo.nodes:
        for c in topo.shared[n]:
            _close(topo.states[n][c], topo.initial[c], atol=1e-7, rtol=0)
    # a generous deadline changes nothing compared with none
    ok, _, ok_stats = _round(_cfg(**{"topology.default.deadline_s": 1e6}))
    assert ok_stats[0].late == [] and ok.round_metrics()["consensus_distance"] > 0


def test_time_varying_graphs_are_redrawn_per_round_and_keyed():
    fixed, _ = _topology(_cfg(**{"topology.options.graph": "erdos_renyi"}))
    tv, _ = _topology(
        _cfg(**{"topology.options.graph": "erdos_renyi", "topology.options.time_varying": True})
    )
    tv2, _ = _topology(
        _cfg(**{"topology.options.graph": "erdos_renyi", "topology.options.time_varying": True})
    )
    assert fixed.graph_of_round(1) == fixed.graph_of_round(2) == fixed.graph
    assert tv.graph_of_round(1) != tv.graph_of_round(2)
    assert [tv.graph_of_round(r) for r in (1, 2, 3)] == [tv2.graph_of_round(r) for r in (1, 2, 3)]


def test_scoped_components_mix_only_within_their_scope():
    topo, ledger, _ = _round(_cfg(**{"model.scopes": '{"head.*": institution, "prompt.*": local}'}))
    peer = [r for r in ledger.records if r.direction == "peer"]

    def inst(node_id):
        return node_id.split("/")[1]

    heads = [r for r in peer if r.component.startswith("head.")]
    assert heads and all(inst(r.src) == inst(r.dst) for r in heads)
    assert any(inst(r.src) != inst(r.dst) for r in peer if r.component == "adapter.backbone")
    assert not [r for r in peer if r.component.startswith("prompt.")]  # local: never leaves a node


def test_light_clients_receive_the_encoders_they_use_but_do_not_train():
    pytest.importorskip("sklearn")
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "data.name": "digits",
                "data.options.resource_mix": "{light: 0.5, full: 0.5}",
            }
        ),
        topology="gossip",
    )
    topo, _, stats = _round(cfg)
    light = [n for n in topo.nodes if topo.federation.by_id[n].resource == "light"]
    assert light and stats[0].participants == len(topo.nodes)
    moved = 0.0
    for n in light:
        assert "encoder.image" in topo.uses[n] and "encoder.image" not in topo.holds[n]
        w = "encoder.image"
        moved = max(
            moved,
            max(
                float((topo.states[n][w][p] - topo.initial[w][p]).abs().max())
                for p in topo.initial[w]
            ),
        )
        assert topo._weight(n, w) == 0.0  # its untrained copy carries no weight in the mix
    assert moved > 1e-4


def test_model_update_attackers_reach_their_gossip_neighbours():
    """On the gossip topology there is no parent: attackers act through what they send their
    neighbours. A scaling attack must change the result (it was silently a no-op before)."""
    from hierfed.simulation import run

    def final(**extra):
        over = {"runtime.name": "local", "rounds": 1, **extra}
        cfg = load_config(None, tiny_overrides(**over), topology="gossip")
        return run(cfg, write=False).final_state

    clean = final()
    attacked = final(**{"attack.name": "scaling", "attack.fraction": 0.34})
    assert any(not torch.equal(clean[c][p], attacked[c][p]) for c in clean for p in clean[c])
    # the clean run is reproducible, so the difference is the attack's
    assert all(torch.equal(clean[c][p], final()[c][p]) for c in clean for p in clean[c])
