"""Shared fixtures: tiny configs and one Ray session for the whole suite."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def tiny_overrides(**extra: object) -> list[str]:
    """Overrides for a federation small enough for unit and integration tests."""
    base = {
        "data.num_institutions": 3,
        "data.students_per_institution": 3,
        "data.samples_per_student": 24,
        "data.global_test_size": 90,
        "data.essay_only_institutions": 1,
        "model.d_model": 16,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.prompt_tokens": 2,
        "train.batch_size": 16,
        "rounds": 2,
        "eval.personalized": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance (2 CPUs) shared by every test that needs real actors."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    from hierfed.config import load_config

    def make(*, topology: str = "hierarchical", **extra: object):
        return load_config(
            None, tiny_overrides(**extra), topology=topology, out=str(tmp_path / "run")
        )

    return make


def play(topo, rnd, runtime, ledger):
    """One round of ``topo`` as the run loop plays it (fresh channels on ``ledger``); returns
    the round's context (``.stats``, ``.times``)."""
    from hierfed.engine import ChannelSet, RoundContext

    channels = ChannelSet(topo.cfg, topo.federation, ledger)
    ctx = RoundContext(round=rnd, runtime=runtime, channels=channels, clients=topo.clients)
    topo.run_round(ctx)
    return ctx
