"""Fair rules above the tier that merges clients (issue 18): a tier node's update carries
its members' sample-weighted mean loss, so q-FFL and AFL work at the global tier."""

from __future__ import annotations

import pytest
import torch

import hierfed.runtime.worker as worker
from hierfed.config import load_config
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeTask
from hierfed.runtime.merge import combine_stats, merge_node_round
from hierfed.simulation import run
from hierfed.update import Update
from tests.conftest import tiny_overrides
from tests.test_merge_checks import SPEC, STATE


def _upd(sender, loss, n):
    delta = {"head.t": {"w": torch.ones(3)}}
    return Update.from_delta(
        delta, float(n), sender=sender, round=1, num_samples=n, stats={"loss": loss}
    )


def test_combine_stats_by_hand():
    # (2 * 1 + 6 * 3) / 8 = 2.5; a node-round that merged nothing does not count
    assert combine_stats([(2, {"loss": 1.0}), (0, {}), (6, {"loss": 3.0, "acc": 1.0})]) == {
        "loss": 2.5
    }
    assert combine_stats([(0, {}), (0, {})]) == {}


def test_a_folded_emit_carries_the_sample_weighted_loss_of_every_node_round():
    cfg = load_config(None, tiny_overrides())
    senders = ["global/inst-00/student-000", "global/inst-00/student-001"]
    pool = {senders[0]: _upd(senders[0], 1.0, 1), senders[1]: _upd(senders[1], 4.0, 3)}
    exps = tuple(
        Expectation(s, frozenset({"head.t"}), exact=False, max_weight=10.0) for s in senders
    )
    state = {"head.t": STATE["head.t"]}
    task = MergeTask(
        "global/inst-00",
        "institution",
        1,
        (0, 1),
        exps,
        state,
        emit=True,
        start=state,
        sends=("head.t",),
        parent_id="global",
        parent_tier="global",
        emit_samples=4,
        emit_prior={"head.t": (4.0,)},
        local_rounds=2,
        emit_stats=((4, {"loss": 2.0}),),
    )
    res = merge_node_round(task, pool, cfg=cfg, spec=SPEC)
    # this node-round: (1 * 1 + 3 * 4) / 4 = 3.25; with the earlier one (4 rows at 2.0): 2.625
    assert res.stats == {"loss": 3.25}
    assert res.emitted is not None
    assert res.emitted.meta.stats == {"loss": pytest.approx(2.625)}
    assert res.emitted.meta.num_samples == 8


def _run_recording(monkeypatch, **over):
    calls = []

    def recording(task, pool, *, cfg, spec):
        res = merge_node_round(task, pool, cfg=cfg, spec=spec)
        calls.append((task, dict(pool), res))
        return res

    monkeypatch.setattr(worker, "merge_node_round", recording)
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local", **over}))
    return run(cfg, write=False), calls


@pytest.mark.parametrize(
    "rule, over",
    [
        # two institution node-rounds, emit folded into the last merge
        ("qffl", {"topology.tiers.institution.local_rounds": 2}),
        # sibling mixing: the emit is its own task after the mix
        (
            "afl",
            {
                "topology.tiers.institution.peer_steps": 1,
                "topology.tiers.institution.peer_graph": "complete",
            },
        ),
    ],
)
def test_fair_rule_at_the_global_tier_gets_the_institutions_mean_loss(monkeypatch, rule, over):
    result, calls = _run_recording(
        monkeypatch, **{"topology.tiers.global.aggregator": rule, **over}
    )
    assert [m["round"] for m in result.metrics] == [0, 1, 2]  # round 0: the starting model
    assert all(m.get("rejected", 0) == 0 for m in result.metrics)
    # by hand: per round and institution, sum(rows * loss) / sum(rows) over the students it
    # accepted in all its node-rounds
    num: dict = {}
    den: dict = {}
    for task, pool, res in calls:
        if task.tier == "institution" and res.accepted:
            key = (task.round, task.node_id)
            for s in res.accepted:
                n = pool[s].meta.num_samples
                num[key] = num.get(key, 0.0) + n * pool[s].meta.stats["loss"]
                den[key] = den.get(key, 0) + n
    seen = 0
    for task, pool, res in calls:
        if task.tier != "global":
            continue
        assert res.accepted  # the fair rule merged
        for inst, upd in pool.items():
            want = num[(task.round, inst)] / den[(task.round, inst)]
            assert upd.meta.stats["loss"] == pytest.approx(want, rel=1e-12)
            seen += 1
    assert seen >= 4  # two rounds, at least two institutions each
