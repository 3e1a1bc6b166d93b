"""GPUs that work (issue 14, item 2), checked on a machine without one: a GPU share the Ray
cluster cannot hold is refused at once with an error that names the GPUs, not after
round_timeout_s. (DP-SGD on the worker's device: tests/test_privacy_dpsgd.py.)"""

from __future__ import annotations

import time

import pytest

from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.runtime.gpus import plan_gpu_workers, workers_per_node
from hierfed.simulation import run
from tests.conftest import tiny_overrides

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


def test_node_gpus_reads_each_live_nodes_total_from_ray_nodes():
    from hierfed.runtime.ray import _node_gpus

    class FakeRay:  # the shape of ray.nodes() (Ray 2.55): one dict per node, dead ones kept
        @staticmethod
        def nodes():
            return [
                {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
                {"Alive": True, "Resources": {"CPU": 4.0, "node2": 1.0}},
                {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 8.0}},
            ]

    assert _node_gpus(FakeRay) == [2.0, 0.0]
    # a dead node's GPUs count for nothing: 4 workers of 1 GPU do not fit
    with pytest.raises(ConfigError, match="hold 2 such workers"):
        plan_gpu_workers(1.0, num_workers=4, cpu_workers=12, node_gpus=_node_gpus(FakeRay))
