"""GPUs that work (issue 14, item 2), checked on a machine without one: DP-SGD runs on the
trainer's device and hands its state back on the CPU; a GPU share the Ray cluster cannot
hold is refused at once with an error that names the GPUs, not after round_timeout_s."""

from __future__ import annotations

import time

import pytest
import torch

import hierfed.privacy.dpsgd as dpsgd
from hierfed.client import ClientTrainer
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.model.m3t import build_model
from hierfed.privacy.policy import DPPlan
from hierfed.runtime.gpus import plan_gpu_workers, workers_per_node
from hierfed.seeding import torch_gen
from hierfed.simulation import build_federation, run
from tests.conftest import tiny_overrides

# ---------------------------------------------------------------- DP-SGD on the worker's device


@pytest.fixture(scope="module")
def dp_setup():
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local"}))
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    prof = next(c for c in fed.clients if "image" in c.modalities)
    return cfg, fed, model, prof, model.component_state()


def _fit(trainer, setup, steps=3):
    _, fed, _, prof, start = setup
    # q = 0.5 of 24 rows: an empty Poisson batch has probability 2**-24 per step
    plan = DPPlan("p", 100.0, 1e-5, 1.0, 1.0, 0.5, steps, 10)
    return dpsgd.fit_dp(
        trainer,
        data=fed.train[prof.id],
        tasks=["digit"],
        start=start,
        trainable=["encoder.image", "head.digit", "prompt.digit"],
        key=(1, prof.id),
        dp=dpsgd.DPSpec(plan),
    )


def test_dp_sgd_builds_every_batch_on_the_trainers_device(dp_setup, monkeypatch):
    """Every batch fit_dp hands the model is built for ``trainer.device`` (a GPU worker's
    ``cuda:0``); CPU is used here, so the spy sees the device asked for, and a fit_dp that
    drops it again (builds on the default, the CPU) is caught: it would record None."""
    cfg, _, model, _, _ = dp_setup
    seen: list[torch.device | None] = []
    real = dpsgd._batch

    def spy(data, idx, modalities, task, device=None):
        seen.append(device)
        return real(data, idx, modalities, task, device)

    monkeypatch.setattr(dpsgd, "_batch", spy)
    device = torch.device("cpu")
    fit, _ = _fit(ClientTrainer(model, cfg.train, cfg.seed, device), dp_setup)
    assert fit.steps == 3 and seen == [device] * 3


def test_dp_sgd_state_comes_back_on_the_cpu_and_the_cpu_result_is_unchanged(dp_setup, monkeypatch):
    """The trained state leaves through ``to_cpu`` (as ClientTrainer.fit's does on a GPU), and
    naming the CPU as the device changes no bit of the result."""
    cfg, _, model, _, _ = dp_setup
    moved: list[object] = []
    real = dpsgd.to_cpu

    def spy(state):
        out = real(state)
        moved.append(out)
        return out

    monkeypatch.setattr(dpsgd, "to_cpu", spy)
    on_cpu, hist = _fit(ClientTrainer(model, cfg.train, cfg.seed, torch.device("cpu")), dp_setup)
    assert len(moved) == 1 and on_cpu.state is moved[0]
    assert all(t.device.type == "cpu" for p in on_cpu.state.values() for t in p.values())
    plain, hist0 = _fit(ClientTrainer(model, cfg.train, cfg.seed), dp_setup)
    assert hist == hist0 and on_cpu.loss == plain.loss
    for c, params in plain.state.items():
        for k, t in params.items():
            assert torch.equal(t, on_cpu.state[c][k]), f"{c}/{k}"


def test_dp_noise_generator_on_the_cpu_draws_what_torch_gen_draws():
    # the CPU results (and the pinned digests) keep their noise; on a GPU it is drawn there
    a = dpsgd.noise_generator(torch.device("cpu"), 7, "k", "dp-noise")
    b = torch_gen(7, "k", "dp-noise")
    assert a.device == torch.device("cpu")
    assert torch.equal(torch.normal(0.0, 1.0, (5,), generator=a), torch.randn(5, generator=b))


# ---------------------------------------------------------------- GPU shares vs the cluster


def test_workers_per_node_counts_fractional_shares_without_float_loss():
    # 1 / 0.1 floors to 9 in plain floating point (1 // 0.1 == 9.0); ten shares of 0.1 fit
    assert [workers_per_node(0.1, 1.0), workers_per_node(0.25, 1.0)] == [10, 4]
    assert [workers_per_node(1.0, 3.0), workers_per_node(2.0, 3.0), workers_per_node(2.0, 1.0)] == [
        3,
        1,
        0,
    ]


def test_gpu_plan_caps_the_default_pool_at_what_the_nodes_hold():
    # nodes of 2 and 1 GPUs at 0.5 a worker: 4 + 2 = 6 workers, fewer than 16 CPUs would give
    assert plan_gpu_workers(0.5, num_workers=0, cpu_workers=16, node_gpus=[2.0, 1.0]) == 6
    assert plan_gpu_workers(0.5, num_workers=0, cpu_workers=3, node_gpus=[2.0, 1.0]) == 3
    assert plan_gpu_workers(0.5, num_workers=6, cpu_workers=2, node_gpus=[2.0, 1.0]) == 6
    assert plan_gpu_workers(0.0, num_workers=5, cpu_workers=2, node_gpus=[]) == 5


def test_gpu_plan_refuses_a_share_larger_than_any_node():
    # 3 GPUs in the cluster, but 2 per worker fits on no node of 1 or 2... of 1 and 1 and 1
    with pytest.raises(ConfigError, match=r"largest has 1 GPU .*cluster 3.*at most 1") as info:
        plan_gpu_workers(2.0, num_workers=1, cpu_workers=4, node_gpus=[1.0, 1.0, 1.0])
    assert info.value.key == "runtime.gpus_per_worker" and info.value.value == 2.0


def test_gpu_plan_refuses_more_workers_than_the_gpus_hold():
    # 1.5 GPUs on one node and 1 on another: 0.5 a worker -> 3 + 2 = 5 workers, not 6
    with pytest.raises(ConfigError, match=r"need 3 GPUs.*hold 5 such workers") as info:
        plan_gpu_workers(0.5, num_workers=6, cpu_workers=8, node_gpus=[1.5, 1.0])
    assert info.value.key == "runtime.num_workers" and "runtime.num_workers<=5" in str(info.value)


@pytest.mark.parametrize(("share", "fix"), [(1.5, "whole number"), (0.00005, "four decimals")])
def test_a_gpu_share_ray_cannot_place_is_refused_by_the_config_check(share, fix):
    # load_config validates: refused before Ray or a model starts
    with pytest.raises(ConfigError, match=fix) as info:
        load_config(None, tiny_overrides(**{"runtime.gpus_per_worker": share}))
    assert info.value.key == "runtime.gpus_per_worker" and info.value.value == share


@pytest.mark.ray
def test_gpus_on_a_cluster_without_gpus_fail_at_once_naming_the_gpus(ray_session, tmp_path):
    """The suite's Ray session has 2 CPUs and no GPU. Before the check, the GPU actors stayed
    pending until round_timeout_s and the run failed as 'worker start' (a NodeFailure); now
    the run is refused before any actor starts, with the fix, and leaves no run folder."""
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    out = tmp_path / "gpu"
    cfg = load_config(
        None,
        tiny_overrides(**{"runtime.gpus_per_worker": 1, "runtime.round_timeout_s": 30}),
        out=str(out),
    )
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        run(cfg)
    took = time.perf_counter() - t0
    msg = str(info.value)
    assert info.value.key == "runtime.gpus_per_worker" and info.value.value == 1
    assert "no GPU" in msg and "GPU = 0" in msg and "runtime.gpus_per_worker=0" in msg
    assert "runtime.address" in msg
    # the refusal does not wait on Ray's scheduler: far below the 30 s a pending actor would
    # take (the federation is built first; this bound is loose on a shared, busy machine)
    assert took < 15, took
    assert not out.exists()


def test_the_driver_logs_placement_and_names_gpu_workers_that_see_no_cuda(caplog):
    from hierfed.runtime.ray import _log_placement

    info = [(11, "aa", "cuda:0"), (12, "bb", "cpu"), (13, "aa", "cuda:0")]
    with caplog.at_level("INFO", logger="hierfed.runtime.ray"):
        _log_placement(info, 0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert "worker pool: 3 workers on 2 nodes (node aa: 2, node bb: 1)" in lines
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "workers [1]" in warned[0] and "gpus_per_worker=0.5" in warned[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="hierfed.runtime.ray"):
        _log_placement([(11, "aa", "cpu")], 0.0)  # no GPU asked: the CPU is no news
    assert [r.levelname for r in caplog.records] == ["INFO"]
