"""The simulated clock, dropouts and deadlines in the tree engine (local runtime)."""

from __future__ import annotations

import json

import pytest
import torch

from hierfed.clock import Clock
from hierfed.config import load_config
from hierfed.engine import ChannelSet, Message
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model, model_spec
from hierfed.postprocess.validate import Expectation
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.jobs import MergeTask
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerCore, WorkerSetup
from hierfed.simulation import build_federation, run
from hierfed.update import Update
from tests.conftest import play, tiny_overrides


def _cfg(topology="hierarchical", **extra):
    extra.setdefault("runtime.name", "local")
    return load_config(None, tiny_overrides(**extra), topology=topology)


class SpyRuntime(LocalRuntime):
    """The real local runtime, logging which senders every merge accepted, per round."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.accepted: dict[int, set[str]] = {}
        self.merged_rounds: list[
            tuple[int, int]
        ] = []  # (merge round, round the accepted update was made in)

    def merge(self, tasks, sources):
        out = super().merge(tasks, sources)
        pool = {k: v for src in sources for k, v in src.items()}
        for t, r in zip(tasks, out):
            self.accepted.setdefault(t.round, set()).update(r.accepted)
            self.merged_rounds += [(t.round, pool[s].meta.round) for s in r.accepted]
        return out


def _rounds(cfg, rounds=2):
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    topo = TOPOLOGIES.get(cfg.topology.name)(cfg=cfg, federation=fed, spec=spec)
    topo.init(model.component_state())
    rt = SpyRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    ledger = CommLedger()
    ctxs = [play(topo, r, rt, ledger) for r in range(1, rounds + 1)]
    topo.last_times = ctxs[-1].times  # the last round's simulated arrivals
    return topo, rt, ledger, [c.stats for c in ctxs]


def test_clock_is_keyed_and_heterogeneous_across_institutions():
    cfg = _cfg(**{"clock.compute_sigma": 0.0, "clock.round_jitter": 0.0})
    fed = build_federation(cfg)
    a, b = Clock(cfg, fed), Clock(cfg, fed)
    ids = [c.id for c in fed.clients]
    assert [a.speed(c) for c in ids] == [b.speed(c) for c in ids]
    by_inst: dict[str, set[float]] = {}
    for c in ids:
        by_inst.setdefault(a.group_of(c), set()).add(round(a.speed(c), 9))
    assert all(
        len(v) == 1 for v in by_inst.values()
    )  # no per-client spread: one speed per institution
    assert len({next(iter(v)) for v in by_inst.values()}) == len(by_inst)  # institutions differ
    deep = _cfg(**{"data.options.regions": 2, "data.options.courses_per_institution": 2})
    dc = Clock(deep, build_federation(deep))
    assert dc.group_of("global/region-1/inst-01/course-0/student-002") == "global/region-1/inst-01"
    assert dc.group_of("global/region-1") == "global/region-1"
    other = Clock(_cfg(seed=1), build_federation(_cfg(seed=1)))
    assert other.speed(ids[0]) != a.speed(ids[0])
    # hand-computed: no spread at all -> rows / rows_per_s, and latency + bytes / bandwidth
    flat = _cfg(
        **{
            f"clock.{k}": 0.0
            for k in (
                "compute_sigma",
                "group_sigma",
                "bandwidth_sigma",
                "latency_sigma",
                "round_jitter",
            )
        }
    )
    c = Clock(flat, build_federation(flat))
    p = fed.by_id[ids[0]]
    assert c.compute_s(ids[0], rnd=1, key=()) == pytest.approx(p.num_train * len(p.tasks) / 400.0)
    assert c.transfer_s(ids[0], 2_500_000, rnd=1, key=()) == pytest.approx(
        0.05 + 2_500_000 / (20e6 / 8)
    )


def test_bad_clock_and_tier_values_are_rejected():
    for key, value, match in [
        ("topology.tiers.institution.dropout", 1.0, "dropout"),
        ("topology.default.deadline_s", -1, "deadline_s"),
        ("topology.default.straggler", "wait", "straggler"),
        ("clock.rows_per_s", 0, "rows_per_s"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(**{key: value})


def _deadline(**extra):
    """A deadline between the fastest and the slowest student's arrival in round 1."""
    topo, *_ = _rounds(_cfg(**extra), rounds=1)
    times = sorted(topo.last_times.arrival[c] for c in topo.engine.leaves)
    return round((times[2] + times[-2]) / 2, 4)


def test_dropouts_and_deadlines_are_deterministic_per_seed():
    over = {"topology.tiers.institution.dropout": 0.3}
    over["topology.tiers.institution.deadline_s"] = _deadline()
    a_topo, _, a_led, a = _rounds(_cfg(**over))
    b_topo, _, b_led, b = _rounds(_cfg(**over))
    assert [(s.dropped, s.late, s.sim_time_s) for s in a] == [
        (s.dropped, s.late, s.sim_time_s) for s in b
    ]
    assert sum(len(s.dropped) for s in a) > 0 and sum(len(s.late) for s in a) > 0
    assert a_led.records == b_led.records
    g1, g2 = a_topo.global_state(), b_topo.global_state()
    for c in g1:
        for p in g1[c]:
            torch.testing.assert_close(g1[c][p], g2[c][p], atol=0, rtol=0)
    _, _, _, c = _rounds(_cfg(seed=3, **over))
    assert [s.dropped for s in c] != [s.dropped for s in a]


@pytest.mark.parametrize("policy", ["discard", "drop"])
def test_a_late_update_is_never_merged_in_its_round_or_a_later_one(policy):
    over = {
        "topology.tiers.institution.deadline_s": _deadline(),
        "topology.tiers.institution.straggler": policy,
        "rounds": 3,
    }
    topo, rt, ledger, stats = _rounds(_cfg(**over), rounds=3)
    late = {r: set(s.late) for r, s in enumerate(stats, start=1)}
    assert any(late.values())
    # every merged update was made in the round it was merged in: nothing carries over
    assert rt.merged_rounds and all(m == made for m, made in rt.merged_rounds)
    for r, trained_late in late.items():
        assert not trained_late & rt.accepted[r]
        ups = {x.src for x in ledger.records if x.round == r and x.edge == "student->institution"}
        if policy == "drop":
            assert not trained_late & ups  # told to stop: it sent nothing
        else:
            assert trained_late <= ups  # sent late: the bytes count, the update does not
    # the institution waited exactly until its deadline in a round where someone was late
    for s in stats:
        if s.late:
            assert s.sim_time_s >= over["topology.tiers.institution.deadline_s"]


def test_a_stale_update_is_rejected_at_merge():
    cfg = _cfg()
    fed = build_federation(cfg)
    core = WorkerCore(WorkerSetup(cfg, fed))
    init = core.initial_state()
    delta = {"head.digit": {p: torch.ones_like(t) for p, t in init["head.digit"].items()}}
    upd = Update.from_delta(delta, 3.0, sender="s", round=1, num_samples=3)
    exp = Expectation("s", frozenset({"head.digit"}), exact=True, max_weight=10)
    task = MergeTask(
        node_id="global", tier="global", round=2, key=(0,), expectations=(exp,), state=init
    )
    res = core.merge([task], {"s": upd})[0]
    assert res.accepted == () and "stale update from round 1" in res.rejected[0][1]
    ok = core.merge(
        [
            MergeTask(
                node_id="global", tier="global", round=1, key=(0,), expectations=(exp,), state=init
            )
        ],
        {"s": upd},
    )[0]
    assert ok.accepted == ("s",)


def test_metrics_report_simulated_time_per_round_and_cumulative(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "topology.tiers.institution.dropout": 0.3,
                "topology.tiers.institution.deadline_s": 5.0,
            }
        ),
        topology="hierarchical",
        out=str(tmp_path / "run"),
    )
    res = run(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][
        1:
    ]
    assert all(r["sim_time_s"] > 0 for r in recs)
    assert recs[-1]["sim_time_total_s"] == pytest.approx(sum(r["sim_time_s"] for r in recs))
    assert res.metrics[-1]["dropped"] >= 0 and "late" in recs[0]


def test_a_gossip_step_lasts_until_the_busiest_sender_has_pushed_everything():
    """Per step, each node pushes all it sends through its own link: on the same nodes and
    bytes per link, the complete graph (n-1 sends each) takes longer than the ring (2 each),
    and a step costs exactly the slowest sender's transfer of its total."""
    cfg = _cfg()
    fed = build_federation(cfg)
    clock = Clock(cfg, fed)
    nodes = [c.id for c in fed.clients[:6]]
    per_link = 50_000
    ring = {
        (a, b): per_link for i, a in enumerate(nodes) for b in (nodes[i - 1], nodes[(i + 1) % 6])
    }
    complete = {(a, b): per_link for a in nodes for b in nodes if a != b}

    channel = ChannelSet(cfg, fed, CommLedger()).peers("student")

    def step(links):
        messages = [Message(a, b, {"c": n}) for (a, b), n in sorted(links.items())]
        return channel.exchange(messages, rnd=1, key=("peer", 0))

    assert step(complete) > step(ring) > 0
    assert step(ring) == max(
        clock.transfer_s(n, 2 * per_link, rnd=1, key=("peer", 0)) for n in nodes
    )
