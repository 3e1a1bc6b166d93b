"""Integration: real Ray actors run two rounds of each topology; results are bit-identical
across worker counts and runtimes."""

from __future__ import annotations

import json

import pytest
import torch

from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def _cfg(tmp_path, topology, **extra):
    return load_config(
        None, tiny_overrides(**extra), topology=topology, out=str(tmp_path / topology)
    )


@pytest.mark.parametrize("topology", ["star", "hierarchical"])
def test_two_rounds_on_ray_actors(ray_session, tmp_path, topology):
    cfg = _cfg(tmp_path, topology, **{"runtime.num_workers": 2})
    res = run(cfg)
    assert [m["round"] for m in res.metrics] == [0, 1, 2]
    assert all(m["participants"] == 9 for m in res.metrics[1:])
    edges = set(res.ledger.by_edge())
    if topology == "star":
        assert edges == {"global->student", "student->global"}
    else:
        assert edges == {
            "global->institution",
            "institution->global",
            "institution->student",
            "student->institution",
        }
    # the frozen backbone is never transmitted: only trainable components appear
    comps = set(res.ledger.by_component())
    assert comps and all(c.split(".")[0] in {"encoder", "adapter", "prompt", "head"} for c in comps)
    out = res.out_dir
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "ledger.csv",
        "final_state.safetensors",
        "final_state.json",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "bytes" in json.loads(lines[-1])


def _final(tmp_path, name, **extra):
    cfg = load_config(
        None, tiny_overrides(**extra), topology="hierarchical", out=str(tmp_path / name)
    )
    return run(cfg, write=False).final_state


def test_bit_identical_across_worker_counts_and_runtimes(ray_session, tmp_path):
    extra = {
        "topology.tiers.institution.participation": 0.67,
        "topology.tiers.institution.local_rounds": 2,
    }
    ray2 = _final(tmp_path, "r2", **{"runtime.num_workers": 2}, **extra)
    ray1 = _final(tmp_path, "r1", **{"runtime.num_workers": 1}, **extra)
    # one slice per worker vs. many small chunks handed out as workers free up
    ray2c = _final(
        tmp_path, "r2c", **{"runtime.num_workers": 2, "runtime.chunks_per_worker": 7}, **extra
    )
    ray2s = _final(
        tmp_path, "r2s", **{"runtime.num_workers": 2, "runtime.chunks_per_worker": 1}, **extra
    )
    local = _final(tmp_path, "l1", **{"runtime.name": "local"}, **extra)
    local3 = _final(tmp_path, "l3", **{"runtime.name": "local", "runtime.num_workers": 3}, **extra)
    for other in (ray1, ray2c, ray2s, local, local3):
        assert set(other) == set(ray2)
        for c in ray2:
            for p in ray2[c]:
                assert torch.equal(ray2[c][p], other[c][p]), f"{c}/{p}"
    other_seed = _final(tmp_path, "s1", **{"runtime.name": "local", "seed": 1}, **extra)
    assert any(
        not torch.equal(ray2["head.digit"][p], other_seed["head.digit"][p])
        for p in ray2["head.digit"]
    )


def test_a_bad_model_config_comes_back_from_the_workers_as_a_config_error(ray_session, tmp_path):
    """Workers build the model (the driver does not), so a model the config cannot build
    fails there; the user still gets the ConfigError naming the key, and no run folder."""
    from hierfed.errors import ConfigError

    cfg = _cfg(tmp_path, "star", **{"model.lora_targets": "[no_such_layer]", "rounds": 1})
    with pytest.raises(ConfigError, match="model.lora_targets") as info:
        run(cfg)
    assert info.value.key == "model.lora_targets" and info.value.value == ["no_such_layer"]
    assert not (tmp_path / "star").exists()
