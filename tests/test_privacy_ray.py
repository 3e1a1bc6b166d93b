"""DP accountants travel with the client across Ray actors: one accountant per client per run."""

from __future__ import annotations

import pytest

from hierfed.config import load_config
from hierfed.privacy.accountant import epsilon_of
from hierfed.privacy.policy import plan_for
from hierfed.simulation import build_federation, run
from tests.conftest import tiny_overrides


@pytest.mark.ray
@pytest.mark.slow
def test_accountant_state_persists_across_ray_workers(ray_session, tmp_path):
    extra = {
        "runtime.name": "ray",
        "runtime.num_workers": 2,
        "rounds": 2,
        "data.samples_per_student": 16,
        "train.batch_size": 8,
        "privacy.policies.p.epsilon": 3.0,
        "privacy.assign.global/inst-00/*": "p",
    }
    cfg = load_config(None, tiny_overrides(**extra), out=str(tmp_path / "run"))
    res = run(cfg, write=False)
    fed = build_federation(cfg)
    d2 = res.metrics[2]["dp_sample"]
    assert sorted(d2["clients"]) == sorted(c.id for c in fed.clients if "/inst-00/" in c.id)
    for cid, rep in d2["clients"].items():
        prof = fed.by_id[cid]
        plan = plan_for(cfg, prof, len(fed.train[cid]), fed.tier_names)
        # two participations composed in one accountant, whichever actor trained each round
        want = epsilon_of(
            ((plan.noise_multiplier, plan.sample_rate, 2 * plan.steps_per_round),), 1e-5
        )
        assert rep["participations"] == 2 and rep["epsilon"] == pytest.approx(want, rel=1e-9)
        assert rep["epsilon"] == pytest.approx(3.0, abs=0.03)
        assert res.metrics[1]["dp_sample"]["clients"][cid]["epsilon"] < rep["epsilon"]
