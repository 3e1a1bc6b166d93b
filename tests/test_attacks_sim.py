"""Attack simulators: keyed selection, hand-computed corruptions, label flip, config checks."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from hierfed.attacks import (
    ATTACKS,
    AttackContext,
    attack_pool,
    build_attack,
    malicious_ids,
    poisoned,
)
from hierfed.config import load_config
from hierfed.data.federation import ClientData, TaskSpec
from hierfed.errors import ConfigError
from hierfed.simulation import build_federation
from hierfed.update import Update
from tests.conftest import tiny_overrides

CTX = AttackContext("global/inst-00", 1, 0, num_updates=4, num_malicious=1)


def _upd(sender: str, vals: list[float], w: float = 2.0) -> Update:
    return Update.from_delta({"head.t": {"w": torch.tensor(vals)}}, w, sender=sender, round=1)


def _mean(u: Update) -> torch.Tensor:
    return u.mean()["head.t"]["w"]


def test_malicious_selection_is_keyed_and_sized():
    cfg = load_config(None, tiny_overrides())
    fed = build_federation(cfg)
    a = malicious_ids(fed, "student", 0.3, seed=0)
    assert len(a) == 3 and a == malicious_ids(fed, "student", 0.3, seed=0)  # round(0.3 x 9) = 3
    assert a != malicious_ids(fed, "student", 0.3, seed=1) or len(a) == 9
    inst = malicious_ids(fed, "institution", 0.34, seed=0)
    assert len(inst) == 1 and next(iter(inst)).count("/") == 1
    with pytest.raises(ConfigError, match="attack.tier"):
        malicious_ids(fed, "course", 0.2, seed=0)


def test_model_update_attacks_hand_computed():
    u = _upd("m", [1.0, -2.0])
    benign = [u, _upd("a", [3.0, 0.0]), _upd("b", [5.0, 2.0]), _upd("c", [3.0, 4.0])]
    assert torch.allclose(
        _mean(ATTACKS.get("sign_flip")({}).corrupt(u, benign, CTX)), torch.tensor([-1.0, 2.0])
    )
    assert torch.allclose(
        _mean(ATTACKS.get("sign_flip")({"scale": 3}).corrupt(u, benign, CTX)),
        torch.tensor([-3.0, 6.0]),
    )
    # scaling: by 100 by default; scale 0 boosts by n = 4 (model replacement)
    assert torch.allclose(
        _mean(ATTACKS.get("scaling")({"scale": 0}).corrupt(u, benign, CTX)),
        torch.tensor([4.0, -8.0]),
    )
    assert torch.allclose(
        _mean(ATTACKS.get("scaling")({}).corrupt(u, benign, CTX)), torch.tensor([100.0, -200.0])
    )
    # ALIE: mean - z * std (population std) over the node's benign updates
    x = torch.tensor([[1.0, -2.0], [3.0, 0.0], [5.0, 2.0], [3.0, 4.0]])
    n, f = 4, 1
    s = math.floor(n / 2 + 1) - f
    z = NormalDist().inv_cdf((n - s) / n)
    out = _mean(ATTACKS.get("alie")({}).corrupt(u, benign, CTX))
    assert torch.allclose(out, x.mean(0) - z * x.std(0, unbiased=False), atol=1e-6)
    assert torch.allclose(
        _mean(ATTACKS.get("alie")({"z": 1.0}).corrupt(u, benign, CTX)),
        x.mean(0) - x.std(0, unbiased=False),
    )
    # every attack keeps the declared weight
    for name in ("sign_flip", "scaling", "gaussian", "alie"):
        assert ATTACKS.get(name)({}).corrupt(u, benign, CTX).weights == u.weights


def test_gaussian_attack_is_keyed_noise():
    u = _upd("m", [0.0] * 4000)
    a = ATTACKS.get("gaussian")({"std": 2.0})
    x, y = _mean(a.corrupt(u, [u], CTX)), _mean(a.corrupt(u, [u], CTX))
    assert torch.equal(x, y)
    assert float(x.std()) == pytest.approx(2.0, rel=0.05)


def test_label_flip_poisons_only_malicious_clients():
    data = ClientData(
        {"tabular": np.zeros((3, 2), np.float32)},
        {"c": np.array([0, 1, 2]), "r": np.array([0.5, -1.0, 2.0], np.float32)},
    )
    tasks = {
        "c": TaskSpec("c", ("tabular",), 3),
        "r": TaskSpec("r", ("tabular",), 1, kind="regression"),
    }
    cfg = load_config(None, tiny_overrides(**{"attack.name": "label_flip", "attack.fraction": 0.3}))
    fed = build_federation(cfg)
    plan = build_attack(cfg, fed)
    bad = sorted(plan.malicious)[0]
    good = sorted(set(fed.by_id) - plan.malicious)[0]
    out = poisoned(plan, bad, data, tasks)
    assert out.labels["c"].tolist() == [2, 1, 0] and out.labels["r"].tolist() == [-0.5, 1.0, -2.0]
    assert poisoned(plan, good, data, tasks) is data
    assert data.labels["c"].tolist() == [0, 1, 2]  # not mutated


def test_attack_pool_replaces_only_malicious_senders():
    cfg = load_config(None, tiny_overrides(**{"attack.name": "sign_flip", "attack.fraction": 0.3}))
    fed = build_federation(cfg)
    plan = build_attack(cfg, fed)
    ids = sorted(fed.by_id)
    pool = {c: _upd(c, [1.0, 1.0]) for c in ids}
    out = attack_pool(plan, ids, pool, node_id="global/inst-00", round=1, seed=0)
    for c in ids:
        expect = -1.0 if c in plan.malicious else 1.0
        assert torch.allclose(_mean(out[c]), torch.tensor([expect, expect]))
    assert all(torch.equal(_mean(pool[c]), torch.ones(2)) for c in ids)  # input not mutated


def test_attack_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="attack.name.*sign_flip"):
        load_config(None, tiny_overrides(**{"attack.name": "signflip"}))
    with pytest.raises(ConfigError, match="attack.fraction"):
        load_config(None, tiny_overrides(**{"attack.name": "sign_flip", "attack.fraction": 1.0}))
    with pytest.raises(ConfigError, match="attack.options.std"):
        load_config(None, tiny_overrides(**{"attack.name": "gaussian", "attack.options.std": -1.0}))
    with pytest.raises(ConfigError, match="attack.options.zz"):
        load_config(None, tiny_overrides(**{"attack.name": "alie", "attack.options.zz": 1.0}))
    cfg = load_config(
        None,
        tiny_overrides(
            **{"attack.name": "label_flip", "attack.fraction": 0.5, "attack.tier": "institution"}
        ),
    )
    with pytest.raises(ConfigError, match="attack.tier"):
        build_attack(cfg, build_federation(cfg))


def test_scaling_attack_moves_fedavg_far_but_not_the_median(tiny_cfg):
    from hierfed.simulation import run
    from hierfed.update import state_norm, state_sub

    drift = {}
    for agg in ("weighted_mean", "median"):
        cfg = tiny_cfg(
            **{
                "runtime.name": "local",
                "rounds": 1,
                "attack.name": "scaling",
                "attack.fraction": 0.2,
                "topology.tiers.institution.aggregator": agg,
            }
        )
        res = run(cfg, write=False)
        start = run(
            tiny_cfg(
                **{
                    "runtime.name": "local",
                    "rounds": 1,
                    "topology.tiers.institution.aggregator": agg,
                }
            ),
            write=False,
        ).final_state
        drift[agg] = state_norm(state_sub(res.final_state, start))
    # 2 of 9 students boost their delta 100x: FedAvg's global model lands far from the clean
    # run's; the per-institution median ignores them
    assert drift["weighted_mean"] > 20 * drift["median"], drift
