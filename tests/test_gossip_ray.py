"""Gossip on real Ray actors: the mixing runs on the workers and the result is bit-identical
to the in-process runtime with another worker count."""

from __future__ import annotations

import pytest
import torch

from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def test_gossip_on_ray_matches_local_bit_for_bit(ray_session):
    extra = {
        "rounds": 1,
        "topology.options.graph": "torus",
        "topology.options.steps": 2,
        "topology.default.dropout": 0.2,
        "topology.options.eval_nodes": 3,
    }
    ray = run(
        load_config(None, tiny_overrides(**extra, **{"runtime.num_workers": 2}), topology="gossip"),
        write=False,
    )
    loc = run(
        load_config(
            None,
            tiny_overrides(**extra, **{"runtime.name": "local", "runtime.num_workers": 3}),
            topology="gossip",
        ),
        write=False,
    )
    a, b = ray.metrics[-1], loc.metrics[-1]
    assert a["consensus_distance"] == b["consensus_distance"] > 0
    assert a["node_metric_worst"] == b["node_metric_worst"]
    assert (
        set(ray.ledger.by_edge()) == {"student<->student"}
        and ray.ledger.total() == loc.ledger.total()
    )
    for c in ray.final_state:
        for p in ray.final_state[c]:
            assert torch.equal(ray.final_state[c][p], loc.final_state[c][p]), f"{c}/{p}"
