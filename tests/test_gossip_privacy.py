"""DP-SGD under gossip: every client's accountant is carried across rounds and checkpoints,
exactly as under a tree (issue 12: ε used to restart every gossip round)."""

from __future__ import annotations

from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides
from tests.test_gossip_resume import _digest, resume_from_round_1

DP = {"privacy.policies.p.epsilon": 8.0, "privacy.default": "p", "runtime.name": "local"}


def _dp(result, rnd):
    return result.metrics[rnd]["dp_sample"]


def test_gossip_carries_each_clients_epsilon_across_rounds():
    cfg = load_config(None, tiny_overrides(**DP, rounds=3), topology="gossip")
    res = run(cfg, write=False)
    reports = [_dp(res, r)["clients"] for r in (1, 2, 3)]
    clients = sorted(reports[0])
    assert len(clients) == 9
    for c in clients:
        eps = [rep[c]["epsilon"] for rep in reports]
        assert [rep[c]["participations"] for rep in reports] == [1, 2, 3]
        assert eps[0] < eps[1] < eps[2] <= 8.0 + 1e-6  # spent in turn, within the budget


def test_gossip_matches_the_tree_on_per_client_epsilon():
    """Same clients, same DP plan, same keyed batches: the accountant after each round is the
    same under gossip as under star (privacy does not depend on who merges the updates)."""
    star = run(load_config(None, tiny_overrides(**DP, rounds=2), topology="star"), write=False)
    gossip = run(load_config(None, tiny_overrides(**DP, rounds=2), topology="gossip"), write=False)
    for r in (1, 2):
        assert _dp(gossip, r)["clients"] == _dp(star, r)["clients"]


def test_a_budget_planned_for_one_participation_sits_gossip_clients_out_after_it():
    over = {**DP, "privacy.policies.p.rounds": 1, "rounds": 3}
    star = run(load_config(None, tiny_overrides(**over), topology="star"), write=False)
    gossip = run(load_config(None, tiny_overrides(**over), topology="gossip"), write=False)
    for res in (star, gossip):
        assert res.metrics[1]["participants"] == 9 and _dp(res, 1)["sat_out"] == []
        for r in (2, 3):
            assert res.metrics[r]["participants"] == 0
            assert len(_dp(res, r)["sat_out"]) == 9
            assert all(rep["participations"] == 1 for rep in _dp(res, r)["clients"].values())


def test_gossip_with_dp_resumes_with_its_accountants(tmp_path):
    out = tmp_path / "run"
    over = {**DP, "rounds": 3, "checkpoint.keep": 3}
    run(load_config(None, tiny_overrides(**over), topology="gossip", out=str(out)))
    reference = _digest(out)
    resume_from_round_1(out)
    state, metrics = _digest(out)
    assert (state, metrics) == reference
    assert [m["dp_sample"]["max_epsilon"] > 0 for m in metrics[1:]] == [True] * 3
