"""Leaf gossip: the students of one parent train and mix device to device between aggregations
by their parent (``topology.tiers.student.peer_steps`` / ``peer_graph`` / ``local_rounds``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed import mixing
from hierfed.config import load_config
from hierfed.errors import ConfigError, NodeFailure
from hierfed.model.m3t import build_model, model_spec
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation, run
from hierfed.update import Update
from tests.conftest import tiny_overrides

INST = ("global/inst-00", "global/inst-01", "global/inst-02")
ADAPTER = "adapter.backbone"  # every student of the tiny federation holds it


def _cfg(**extra):
    extra.setdefault("runtime.name", "local")
    extra.setdefault("rounds", 1)
    return load_config(None, tiny_overrides(**extra), topology="hierarchical")


def _gossip(graph="complete", steps=1, passes=1):
    return {
        "topology.tiers.student.peer_steps": steps,
        "topology.tiers.student.peer_graph": graph,
        "topology.tiers.student.local_rounds": passes,
    }


class UploadSpy(LocalRuntime):
    """The in-process runtime, keeping every update that reaches an institution's merge."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.uploads: dict[str, Update] = {}

    def merge(self, tasks, sources):
        if any(t.tier == "institution" and t.expectations for t in tasks):
            for src in sources:
                self.uploads.update({k: v for k, v in src.items() if "/student-" in k})
        return super().merge(tasks, sources)


def _uploads(cfg):
    spy = UploadSpy(cfg.runtime)
    spy.start(WorkerSetup(cfg, build_federation(cfg)))
    result = run(cfg, runtime=spy, write=False)
    return spy.uploads, result


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().flatten()


def _gap(a, b) -> float:
    return max(float((a[c][p] - b[c][p]).abs().max()) for c in a for p in a[c])


@pytest.mark.parametrize("graph, students", [("complete", 3), ("ring", 4)])
def test_one_pass_of_leaf_gossip_keeps_what_the_parent_merges(graph, students):
    """R = 1: each student trains exactly as without gossip, then mixes. Push-sum mixing keeps
    the pre-weighted sum of the uploads and the sum of their weights, so the institutions (and
    the global model) end where they end without gossip, on any graph and with unequal sizes."""
    base = {"data.students_per_institution": students}
    plain_up, plain = _uploads(_cfg(**base))
    peer_up, peer = _uploads(_cfg(**base, **_gossip(graph)))
    assert sorted(plain_up) == sorted(peer_up) and len(peer_up) == 3 * students
    assert len({u.weights[ADAPTER] for u in plain_up.values()}) > 3  # unequal client sizes
    for inst in INST:
        kids = [c for c in plain_up if c.startswith(inst + "/")]
        for c in plain_up[kids[0]].tensors:
            holders = [k for k in kids if c in plain_up[k].tensors]
            w_plain = sum(plain_up[k].weights[c] for k in holders)
            w_peer = sum(peer_up[k].weights[c] for k in holders)
            assert w_peer == pytest.approx(w_plain, rel=1e-12)
            for p in plain_up[kids[0]].tensors[c]:
                s_plain = sum(_flat(plain_up[k].tensors[c][p]) for k in holders)
                s_peer = sum(_flat(peer_up[k].tensors[c][p]) for k in holders)
                torch.testing.assert_close(s_peer, s_plain, atol=1e-5, rtol=1e-5)
        # the uploads themselves did change: the students mixed before sending
        means = [peer_up[k].mean()[ADAPTER] for k in kids]
        own = [plain_up[k].mean()[ADAPTER] for k in kids]
        key = sorted(means[0])[0]
        moved = max(float((m[key] - o[key]).abs().max()) for m, o in zip(means, own))
        assert moved > 1e-5
        if graph == "complete":
            # on the complete graph every student sends the group's sample-weighted mean delta
            fedavg = sum(_flat(plain_up[k].tensors[ADAPTER][key]) for k in kids) / sum(
                plain_up[k].weights[ADAPTER] for k in kids
            )
            for m in means:
                torch.testing.assert_close(_flat(m[key]), fedavg, atol=1e-6, rtol=1e-5)
    assert _gap(peer.final_state, plain.final_state) < 1e-5
    assert plain.ledger.by_edge().get("student<->student", 0) == 0
    assert peer.ledger.by_edge()["student<->student"] > 0


def test_more_passes_change_the_result():
    plain = run(_cfg(), write=False)
    two = run(_cfg(**_gossip("ring", passes=2)), write=False)
    assert _gap(two.final_state, plain.final_state) > 1e-3


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 7),
    steps=st.integers(1, 3),
    graph=st.sampled_from(["ring", "complete", "torus", "erdos_renyi"]),
    seed=st.integers(0, 10_000),
)
def test_a_mixing_step_preserves_the_weighted_sum_and_the_total_weight(n, steps, graph, seed):
    """The law behind the test above, on random graphs, weights, values and holdings."""
    rng = np.random.default_rng(seed)
    nodes = [f"s{i}" for i in range(n)]
    edges = mixing.build_graph(mixing.GraphSpec(kind=graph, p=0.5), nodes, rng)
    # "a" is held by all, "b" by a random non-empty subset (heterogeneous students)
    holds_b = [i for i in range(n) if rng.random() < 0.6] or [0]
    carried = {
        x: {
            "a": float(rng.integers(1, 50)),
            **({"b": float(rng.integers(1, 50))} if i in holds_b else {}),
        }
        for i, x in enumerate(nodes)
    }
    values = {
        x: {c: {"w": torch.from_numpy(rng.normal(size=(3, 2)))} for c in carried[x]} for x in nodes
    }
    rows, new_w = mixing.push_sum_plan(nodes, edges, carried, steps)
    mixed = {x: {} for x in nodes}
    for x, groups in rows.items():
        for comps, row in groups:
            for c in comps:
                mixed[x][c] = mixing.combine([(a, values[src][c]) for src, a in row])
    for c in ("a", "b"):
        holders = [x for x in nodes if c in carried[x]]
        assert sorted(x for x in nodes if c in mixed[x]) == holders  # non-holders get nothing
        assert sum(new_w[x][c] for x in holders) == pytest.approx(
            sum(carried[x][c] for x in holders), rel=1e-12
        )
        before = sum(carried[x][c] * values[x][c]["w"] for x in holders)
        after = sum(new_w[x][c] * mixed[x][c]["w"] for x in holders)
        torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-9)
    if graph == "complete" and steps == 1:  # one step on the complete graph: everyone agrees
        for x in nodes:
            torch.testing.assert_close(mixed[x]["a"]["w"], mixed[nodes[0]]["a"]["w"])


def test_the_ledger_counts_every_exchange_and_the_clock_charges_it():
    base = {"data.students_per_institution": 4}
    plain = run(_cfg(**base), write=False)
    peer = run(_cfg(**base, **_gossip("ring", steps=2, passes=2)), write=False)
    recs = [r for r in peer.ledger.records if r.direction == "peer"]
    assert {r.edge for r in recs} == {"student<->student"}
    exchanges = [(r.src, r.dst) for r in recs if r.component == ADAPTER]
    # per institution: a ring of 4 has 4 links; 2 directions x 2 steps x 2 passes each
    assert len(exchanges) == 3 * 4 * 2 * 2 * 2
    for inst in INST:
        kids = [f"{inst}/student-{i:03d}" for i in range(4)]
        ring = {(kids[i], kids[j]) for i, j in mixing.ring(4)}
        pairs = {(a, b) for a, b in exchanges if a.startswith(inst + "/")}
        assert pairs == ring | {(b, a) for a, b in ring}
        assert all(exchanges.count(p) == 4 for p in pairs)
    # the upload to the parent is still one record per student and component
    ups = lambda res: sorted(  # noqa: E731
        (r.src, r.component) for r in res.ledger.records if r.edge == "student->institution"
    )
    assert ups(peer) == ups(plain)
    assert peer.metrics[-1]["sim_time_s"] > plain.metrics[-1]["sim_time_s"]
    # a student pushes all its exchanges through its own link: the complete graph (3 neighbours
    # each) takes longer per step than the ring (2), and moves more bytes
    dense = run(_cfg(**base, **_gossip("complete", steps=2, passes=2)), write=False)
    assert dense.metrics[-1]["sim_time_s"] > peer.metrics[-1]["sim_time_s"]
    ring_b, dense_b = (r.ledger.by_edge()["student<->student"] for r in (peer, dense))
    assert dense_b > ring_b


def test_dropped_students_neither_train_nor_mix_nor_report():
    cfg = _cfg(
        **{"data.students_per_institution": 4, "topology.tiers.institution.dropout": 0.4},
        **_gossip("ring", passes=2),
    )
    res = run(cfg, write=False)
    peers = {r.src for r in res.ledger.records if r.direction == "peer"} | {
        r.dst for r in res.ledger.records if r.direction == "peer"
    }
    up = {r.src for r in res.ledger.records if r.edge == "student->institution"}
    everyone = {c.id for c in build_federation(cfg).clients}
    absent = everyone - up
    assert absent, "dropout 0.4 over 12 students should drop someone (fixed seed)"
    assert res.metrics[-1]["dropped"] == len(absent)
    assert not (absent & peers)
    assert peers  # the others still gossip


def test_a_failed_student_leaves_the_graph_and_counts_against_the_quorum():
    bad = "global/inst-00/student-000"
    extra = {
        **_gossip("complete", passes=2),
        "runtime.on_client_failure": "drop",
        "runtime.faults": f"[raise:{bad}]",
    }
    ok = run(_cfg(**extra, **{"topology.tiers.institution.quorum": 0.6}), write=False)
    assert ok.metrics[-1]["failed"] == 1
    touched = {x for r in ok.ledger.records if r.direction != "down" for x in (r.src, r.dst)}
    assert bad not in touched  # it never mixed nor reported
    assert {"global/inst-00/student-001", "global/inst-00/student-002"} <= touched
    with pytest.raises(NodeFailure, match="quorum") as info:
        run(_cfg(**extra, **{"topology.tiers.institution.quorum": 0.9}), write=False)
    assert info.value.node_id == "global/inst-00"


def test_leaf_gossip_is_deterministic_and_bit_identical_on_ray(ray_session):
    extra = {
        **_gossip("ring", steps=2, passes=2),
        "data.students_per_institution": 4,
        "topology.tiers.institution.participation": 0.75,
        "topology.tiers.institution.dropout": 0.2,
        # attackers corrupt what they send their peers as well (WorkerCore.mix)
        "attack.name": "sign_flip",
        "attack.fraction": 0.25,
    }
    loc1 = run(_cfg(**extra, **{"runtime.num_workers": 1}), write=False)
    loc3 = run(_cfg(**extra, **{"runtime.num_workers": 3}), write=False)
    ray = run(
        _cfg(**extra, **{"runtime.name": "ray", "runtime.num_workers": 2}),
        write=False,
    )
    assert ray.ledger.by_edge()["student<->student"] > 0
    for other in (loc3, ray):
        assert other.ledger.records == loc1.ledger.records
        assert other.metrics[-1]["sim_time_s"] == loc1.metrics[-1]["sim_time_s"]
        assert other.metrics[-1]["train_loss"] == loc1.metrics[-1]["train_loss"]
        for c in loc1.final_state:
            for p in loc1.final_state[c]:
                assert torch.equal(other.final_state[c][p], loc1.final_state[c][p]), f"{c}/{p}"


def _build(**extra):
    cfg = _cfg(**extra)
    fed = build_federation(cfg)
    spec = model_spec(build_model(cfg.model, fed, cfg.seed), fed, cfg.model)
    return TOPOLOGIES.get("hierarchical")(cfg=cfg, federation=fed, spec=spec)


@pytest.mark.parametrize(
    "extra, key, says",
    [
        ({"topology.tiers.student.peer_steps": -1}, "topology.tiers.student.peer_steps", ">= 0"),
        (
            {"topology.tiers.student.peer_graph": "star"},
            "topology.tiers.student.peer_graph",
            "known",
        ),
        (
            {"topology.tiers.student.peer_steps": 1, "topology.tiers.student.local_rounds": 0},
            "topology.tiers.student.local_rounds",
            "positive",
        ),
    ],
)
def test_bad_values_fail_when_the_config_loads(extra, key, says):
    with pytest.raises(ConfigError, match=says) as err:
        _cfg(**extra)
    assert err.value.key == key


@pytest.mark.parametrize(
    "extra, key, says",
    [
        # a random 3-regular graph needs at least 4 members; institutions sample 3 students
        (_gossip("random_regular"), "topology.tiers.student.peer_graph", "3 members"),
        (_gossip("small_world"), "topology.tiers.student.peer_graph", "ring, torus or complete"),
        (
            {"topology.tiers.student.participation": 0.5},
            "topology.tiers.student.participation",
            "topology.tiers.institution.participation",
        ),
        (
            {"topology.tiers.student.local_rounds": 2},
            "topology.tiers.student.local_rounds",
            "peer_steps >= 1",
        ),
        (
            {"topology.tiers.student.postprocess": "[fp16]"},
            "topology.tiers.student.postprocess",
            "peer_steps >= 1",
        ),
    ],
)
def test_bad_leaf_settings_fail_before_any_work(extra, key, says):
    with pytest.raises(ConfigError, match=says) as err:
        _build(**extra)
    assert err.value.key == key


def test_a_graph_that_fits_more_students_is_accepted():
    topo = _build(**{"data.students_per_institution": 4}, **_gossip("random_regular"))
    assert topo.engine.d2d is not None and topo.engine.d2d.peer_graph == "random_regular"
    # `default` configures aggregating tiers only: it never switches leaf gossip on
    topo = _build(**{"topology.default.peer_steps": 1})
    assert topo.engine.d2d is None


class AllUploads(LocalRuntime):
    """The in-process runtime, keeping every update that reaches any merge."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.uploads: dict[str, Update] = {}

    def merge(self, tasks, sources):
        if any(t.expectations for t in tasks):
            for src in sources:
                self.uploads.update(src)
        return super().merge(tasks, sources)


@pytest.mark.parametrize("gossip", [False, True])
def test_uploads_name_the_training_rows_behind_them(gossip):
    """Metadata only, but it must be right: a student's update carries its training rows and an
    institution's the rows merged under it (before, both were 0 for emitted updates)."""
    cfg = _cfg(**(_gossip("ring") if gossip else {}))
    fed = build_federation(cfg)
    spy = AllUploads(cfg.runtime)
    spy.start(WorkerSetup(cfg, fed))
    run(cfg, runtime=spy, write=False)
    students = {k: u for k, u in spy.uploads.items() if "/student-" in k}
    insts = {k: u for k, u in spy.uploads.items() if "/student-" not in k}
    assert students and insts
    for c, u in students.items():
        assert u.meta.num_samples == fed.by_id[c].num_train
    for i, u in insts.items():
        assert u.meta.num_samples == sum(
            s.meta.num_samples for c, s in students.items() if c.startswith(i + "/")
        )


def test_inner_peer_graph_must_connect_whatever_dropouts_leave():
    """Institutions mix over those that did not drop out: with dropout on, every member count
    from 2 up must be connectable, or the run would fail mid-way."""
    inner = {
        "data.num_institutions": 6,
        "topology.tiers.institution.peer_steps": 1,
        "topology.tiers.institution.peer_graph": "random_regular",
    }
    _build(**inner)  # six institutions: a random 3-regular graph exists
    with pytest.raises(ConfigError, match="dropouts .* can leave 2 of the 6") as err:
        _build(**inner, **{"topology.tiers.global.dropout": 0.2})
    assert err.value.key == "topology.tiers.institution.peer_graph"
    _build(
        **{**inner, "topology.tiers.institution.peer_graph": "ring"},
        **{"topology.tiers.global.dropout": 0.2},
    )


def test_attackers_corrupt_what_they_send_their_peers():
    """A model-update attacker sends its neighbours the corrupted update too, not only its
    institution: with sign_flip, the attacker's half-step value a benign neighbour mixes
    in is start - mean delta. Benign senders' values are untouched."""
    from hierfed.postprocess.validate import Expectation
    from hierfed.runtime.jobs import MixTask, TrainJob
    from hierfed.runtime.worker import WorkerCore

    cfg = _cfg(**_gossip("complete"), **{"attack.name": "sign_flip", "attack.fraction": 0.34})
    fed = build_federation(cfg)
    core = WorkerCore(WorkerSetup(cfg, fed))
    assert core.attack is not None
    bad = sorted(core.attack.malicious)[0]
    inst = bad.rsplit("/", 1)[0]
    good = next(
        c.id
        for c in fed.clients
        if c.id.startswith(inst + "/") and c.id not in core.attack.malicious
    )
    holds = {c: core.spec.holds(fed.by_id[c]) for c in (bad, good)}
    state = core.initial_state()
    jobs = [
        TrainJob(c, "global", "student", 1, (1, i, c), holds[c], holds[c], None, None)
        for i, c in enumerate(sorted((bad, good)))
    ]
    _, ups = core.train(jobs, {"global": state})
    shared = tuple(sorted(set(holds[bad]) & set(holds[good])))
    assert shared
    expect = {c: Expectation(c, frozenset(holds[c]), True, 1e9) for c in (bad, good)}
    task = MixTask(good, 1, ((shared, tuple(sorted(((bad, 0.5), (good, 0.5))))),))
    starts = {bad: state, good: state}
    attacked = core.mix([task], starts, expect, ups)[0].state
    core.attack = None
    honest = core.mix([task], starts, expect, ups)[0].state
    d_bad, d_good = ups[bad].mean(), ups[good].mean()
    for c in shared:
        for p, s0 in state[c].items():
            want = 0.5 * (s0 + d_good[c][p]) + 0.5 * (s0 - d_bad[c][p])
            assert torch.allclose(attacked[c][p], want, atol=1e-6), f"{c}/{p}"
            fair = 0.5 * (s0 + d_good[c][p]) + 0.5 * (s0 + d_bad[c][p])
            assert torch.allclose(honest[c][p], fair, atol=1e-6), f"{c}/{p}"
    assert any(not torch.equal(attacked[c][p], honest[c][p]) for c in shared for p in state[c])
