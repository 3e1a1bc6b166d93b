"""Per-round contributions in metrics.jsonl (issue 18, ``eval.contributions``): each
accepted sender's leave-one-out influence on its parent's merge, summed over the round."""

from __future__ import annotations

import json

import pytest
import torch

import hierfed.runtime.worker as worker
from hierfed.config import load_config
from hierfed.explain.contribution import loo_influence
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeTask
from hierfed.runtime.merge import merge_node_round
from hierfed.simulation import run
from hierfed.update import Update
from tests.conftest import tiny_overrides
from tests.test_merge_checks import SPEC, STATE

A, B = "global/inst-00/student-000", "global/inst-00/student-001"


def _task():
    exps = tuple(
        Expectation(s, frozenset({"head.t"}), exact=False, max_weight=10.0) for s in (A, B)
    )
    return MergeTask("global/inst-00", "institution", 1, (0, 0), exps, {"head.t": STATE["head.t"]})


def _pool():
    def upd(s, x, w):
        delta = {"head.t": {"w": torch.tensor([x, 0.0, 0.0])}}
        return Update.from_delta(delta, w, sender=s, round=1, num_samples=int(w))

    return {A: upd(A, 1.0, 1.0), B: upd(B, 3.0, 3.0)}


@pytest.mark.parametrize("on", [False, True])
def test_a_node_round_reports_leave_one_out_influence_only_when_asked(on):
    cfg = load_config(None, tiny_overrides(**{"eval.contributions": on}))
    res = merge_node_round(_task(), _pool(), cfg=cfg, spec=SPEC)
    if not on:
        assert res.contributions == {}
        return
    # merged mean (1 + 9) / 4 = 2.5; without a: 9 / 3 = 3 (moves 0.5); without b: 1 (moves 1.5)
    assert res.contributions == {A: pytest.approx(0.5), B: pytest.approx(1.5)}


def test_metrics_carry_each_rounds_contributions(monkeypatch, tmp_path):
    calls = []

    def recording(task, pool, *, cfg, spec):
        res = merge_node_round(task, pool, cfg=cfg, spec=spec)
        calls.append((task, dict(pool), res))
        return res

    monkeypatch.setattr(worker, "merge_node_round", recording)
    over = {"runtime.name": "local", "eval.contributions": True}
    cfg = load_config(None, tiny_overrides(**over), out=str(tmp_path / "run"))
    result = run(cfg)
    # by hand: loo_influence over the updates each merge accepted, summed per sender and round
    want: dict[int, dict[str, float]] = {}
    for task, pool, res in calls:
        if res.weights:
            ups = [pool[s] for s in res.accepted]
            for s, v in loo_influence(Update.sum(ups), ups).items():
                want.setdefault(task.round, {})[s] = want.get(task.round, {}).get(s, 0.0) + v
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    written = {r["round"]: r.get("contributions") for r in map(json.loads, lines)}
    assert set(want) == {1, 2}
    for rnd in (1, 2):
        got = written[rnd]
        assert set(got) == set(want[rnd])
        assert any(s.count("/") == 1 for s in got)  # institutions in the global merge too
        assert any(s.count("/") == 2 for s in got)  # students in their institution's merge
        assert any(v > 0 for v in got.values())
        for s, v in want[rnd].items():
            assert got[s] == pytest.approx(v, rel=1e-9)
    assert result.metrics[1]["contributions"] == written[1]


def test_summary_sums_each_senders_contributions_over_the_run(tmp_path):
    import json

    from hierfed.config import load_config
    from hierfed.simulation import run
    from tests.conftest import tiny_overrides

    over = {"runtime.name": "local", "eval.contributions": True, "rounds": 2}
    out = tmp_path / "run"
    res = run(load_config(None, tiny_overrides(**over), out=str(out)))
    summary = json.loads((out / "summary.json").read_text())["contributions"]
    by_hand: dict[str, float] = {}
    for rec in res.metrics[1:]:
        for sender, value in rec["contributions"].items():
            by_hand[sender] = by_hand.get(sender, 0.0) + value
    assert summary.keys() == by_hand.keys() and len(summary) > 9  # students and institutions
    assert all(abs(summary[k] - by_hand[k]) <= 1e-12 * max(1.0, abs(by_hand[k])) for k in by_hand)
