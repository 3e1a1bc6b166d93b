"""Failures inside a round: dead worker actors, exceptions in client code, stuck clients,
quorums; and no global RNG is ever drawn from."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hierfed.config import load_config
from hierfed.errors import NodeFailure
from hierfed.simulation import build_federation, run
from tests.conftest import tiny_overrides


def _cfg(tmp_path, name, **extra):
    return load_config(None, tiny_overrides(**extra), out=str(tmp_path / name))


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[c][p], b[c][p]) for c in a for p in a[c])


def _clients():
    return [c.id for c in build_federation(load_config(None, tiny_overrides())).clients]


@pytest.mark.ray
def test_killed_worker_is_retried_and_the_result_is_unchanged(ray_session, tmp_path):
    ids = _clients()
    ref = run(_cfg(tmp_path, "ref", **{"runtime.name": "local"}), write=False)
    faults = f"[kill-worker:1:{ids[0]},kill-worker:2:{ids[-1]}]"  # one worker killed in each round
    res = run(
        _cfg(tmp_path, "kill", **{"runtime.num_workers": 2, "runtime.faults": faults}), write=False
    )
    assert [len(m.get("worker_failures", [])) for m in res.metrics[1:]] == [1, 1]
    assert _same(ref.final_state, res.final_state)


@pytest.mark.ray
def test_killed_worker_with_drop_equals_a_run_where_its_clients_failed(ray_session, tmp_path):
    ids = _clients()
    extra = {"runtime.on_worker_failure": "drop", "runtime.on_client_failure": "drop", "rounds": 1}
    res = run(
        _cfg(
            tmp_path,
            "drop",
            **{"runtime.num_workers": 2, "runtime.faults": f"[kill-worker:1:{ids[0]}]"},
            **extra,
        ),
        write=False,
    )
    failed = sorted(f.split(":")[0] for f in res.metrics[1]["failures"])
    assert failed and ids[0] in failed and len(failed) < len(ids)
    # recompute: the same clients failing in their own code, on the local runtime
    raise_faults = "[" + ",".join(f"raise:{c}" for c in failed) + "]"
    again = run(
        _cfg(
            tmp_path, "raise", **{"runtime.name": "local", "runtime.faults": raise_faults}, **extra
        ),
        write=False,
    )
    assert sorted(f.split(":")[0] for f in again.metrics[1]["failures"]) == failed
    assert _same(res.final_state, again.final_state)


@pytest.mark.ray
def test_stuck_client_hits_the_round_timeout(ray_session, tmp_path):
    ids = _clients()
    cfg = _cfg(
        tmp_path,
        "stuck",
        **{
            "runtime.num_workers": 2,
            "runtime.round_timeout_s": 3,
            "runtime.faults": f"[sleep:{ids[1]}:60]",
            "rounds": 1,
        },
    )
    with pytest.raises(NodeFailure, match="round_timeout_s"):
        run(cfg, write=False)


def test_exception_in_client_code_surfaces_as_node_failure_with_the_cause(tmp_path):
    ids = _clients()
    cfg = _cfg(tmp_path, "boom", **{"runtime.name": "local", "runtime.faults": f"[raise:{ids[2]}]"})
    with pytest.raises(NodeFailure) as info:
        run(cfg, write=False)
    assert info.value.node_id == ids[2] and info.value.round == 1
    assert "injected fault" in info.value.cause


def test_quorum_decides_whether_a_round_with_failures_completes(tmp_path):
    ids = _clients()  # 3 institutions x 3 students; fail one student of the first institution
    extra = {
        "runtime.name": "local",
        "runtime.on_client_failure": "drop",
        "runtime.faults": f"[raise:{ids[0]}]",
        "rounds": 1,
    }
    ok = run(
        _cfg(tmp_path, "q1", **extra, **{"topology.tiers.institution.quorum": 0.6}), write=False
    )
    assert ok.metrics[1]["failed"] == 1
    with pytest.raises(NodeFailure, match="quorum") as info:
        run(
            _cfg(tmp_path, "q2", **extra, **{"topology.tiers.institution.quorum": 0.9}), write=False
        )
    assert info.value.node_id == "global/inst-00"


def test_no_global_rng_is_drawn_from_during_a_run(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a global RNG was used")

    def keyed_only(fn):
        def call(*args, **kwargs):
            if kwargs.get("generator") is None:  # torch's global generator
                raise AssertionError(f"torch.{fn.__name__} drew from the global generator")
            return fn(*args, **kwargs)

        return call

    for name in ("random", "randint", "choice", "shuffle", "uniform", "gauss", "sample", "seed"):
        monkeypatch.setattr(random, name, forbidden)
    for name in (
        "rand",
        "randn",
        "randint",
        "choice",
        "shuffle",
        "permutation",
        "normal",
        "uniform",
        "seed",
        "random",
    ):
        monkeypatch.setattr(np.random, name, forbidden)
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial"):
        monkeypatch.setattr(torch, name, keyed_only(getattr(torch, name)))
    torch_state, np_state, py_state = (
        torch.get_rng_state(),
        np.random.get_state(),
        random.getstate(),
    )
    res = run(_cfg(tmp_path, "rng", **{"runtime.name": "local"}), write=False)
    assert res.final_metrics
    # nothing drew from (or reseeded) the global generators behind our back either
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert random.getstate() == py_state


@pytest.mark.ray
def test_a_client_that_kills_every_worker_fails_the_run_instead_of_looping(ray_session, tmp_path):
    """retry re-runs a dead worker's chunk once on a fresh worker; when that worker dies too,
    the run stops with NodeFailure naming the retry (it must not retry forever)."""
    ids = _clients()
    cfg = _cfg(
        tmp_path,
        "crash",
        **{"runtime.num_workers": 2, "runtime.faults": f"[crash-worker:1:{ids[0]}]", "rounds": 1},
    )
    with pytest.raises(NodeFailure, match="retry on a fresh worker"):
        run(cfg, write=False)
