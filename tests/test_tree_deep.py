"""Deeper trees: edu-synth regions and courses, and a four-tier tree aggregating to the flat
weighted mean (the aggregation law, then the engine on real client updates)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed.config import load_config
from hierfed.errors import ConfigError, DataError
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model, model_spec
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.local import LocalRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation, run
from hierfed.update import Update
from tests.conftest import play, tiny_overrides

DEEP = {"data.options.regions": 2, "data.options.courses_per_institution": 2}


def _cfg(**extra):
    extra.setdefault("runtime.name", "local")
    return load_config(None, tiny_overrides(**extra), topology="hierarchical")


def test_regions_and_courses_deepen_the_tree_over_the_same_rows():
    flat = build_federation(_cfg())
    deep = build_federation(_cfg(**DEEP))
    assert deep.tier_names == ("global", "region", "institution", "course", "student")
    assert deep.summary()["tiers"] == {
        "global": 1,
        "region": 2,
        "institution": 3,
        "course": 6,
        "student": 9,
    }
    assert "global/region-1/inst-01/course-0/student-002" in deep.by_id
    # the same students hold the same rows, only grouped deeper
    f = flat.train["global/inst-01/student-002"]
    d = deep.train["global/region-1/inst-01/course-0/student-002"]
    for m in f.inputs:
        assert (f.inputs[m] == d.inputs[m]).all()


@pytest.mark.parametrize(
    ("opts", "err", "match"),
    [
        ({"data.options.courses_per_institution": 4}, DataError, "course with no student"),
        ({"data.options.regions": 4}, DataError, "region with no institution"),
        ({"data.options.cohorts": 2}, ConfigError, "edu-synth takes options"),
    ],
)
def test_empty_groups_and_unknown_options_are_rejected(opts, err, match):
    with pytest.raises(err, match=match):
        build_federation(_cfg(**opts))


@st.composite
def trees(draw):
    """Four tiers of nesting over 2..12 leaves, each leaf an update of 2 components, some
    leaves without the second component (clients hold different subsets)."""
    n = draw(st.integers(2, 12))
    leaves = []
    for i in range(n):
        path = tuple(draw(st.integers(0, 1)) for _ in range(3))  # region, institution, course
        w = draw(st.floats(1, 100))
        a = draw(st.floats(-10, 10))
        b = draw(st.one_of(st.none(), st.floats(-10, 10)))
        delta = {"c.a": {"w": torch.tensor([a], dtype=torch.float64)}}
        if b is not None:
            delta["c.b"] = {"w": torch.tensor([b], dtype=torch.float64)}
        leaves.append((path, Update.from_delta(delta, w, sender=f"s{i:02d}", round=1)))
    return leaves


@settings(max_examples=60, deadline=None)
@given(trees())
def test_four_tier_sums_then_one_division_equal_the_flat_weighted_mean(leaves):
    flat = Update.sum(u for _, u in leaves).mean()
    # course -> institution -> region -> global: every tier only adds pre-weighted updates
    level: dict[tuple, Update] = {}
    for p, u in leaves:
        level[p] = u if p not in level else level[p] + u
    for depth in (2, 1, 0):
        up: dict[tuple, Update] = {}
        for p, u in sorted(level.items()):
            key = p[:depth]
            up[key] = u if key not in up else up[key] + u
        level = up
    deep = level[()].mean()
    assert set(deep) == set(flat)
    for c in flat:
        torch.testing.assert_close(deep[c]["w"], flat[c]["w"], rtol=1e-12, atol=1e-9)


class CollectingRuntime(LocalRuntime):
    """The real local runtime, also keeping every client update it produced."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.updates: dict[str, Update] = {}

    def train(self, jobs, states):
        metas, updates = super().train(jobs, states)
        self.updates.update(updates)
        return metas, updates


def test_a_four_tier_tree_ends_at_the_flat_weighted_mean_of_its_clients():
    cfg = _cfg(**DEEP, rounds=1)
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    topo = TOPOLOGIES.get("hierarchical")(cfg=cfg, federation=fed, spec=spec)
    x0 = model.component_state()
    topo.init(x0)
    rt = CollectingRuntime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    play(topo, 1, rt, CommLedger())
    assert len(topo.tier_names) == 5 and len(rt.updates) == len(fed.clients)
    flat = Update.sum(rt.updates.values()).mean()
    got = topo.global_state()
    for c, params in flat.items():
        for p, d in params.items():
            torch.testing.assert_close(got[c][p], x0[c][p] + d, atol=1e-6, rtol=1e-5)


def test_a_four_tier_config_runs_with_per_tier_settings(tmp_path):
    over = {
        **DEEP,
        "topology.tiers.course.local_rounds": 2,
        "topology.tiers.institution.participation": 0.5,
        "topology.tiers.region.aggregator": "weighted_mean",
        "topology.tiers.global.server_optimizer": "fedavgm",
        "runtime.name": "local",
        "rounds": 1,
    }
    cfg = load_config(
        None, tiny_overrides(**over), topology="hierarchical", out=str(tmp_path / "r")
    )
    res = run(cfg)
    rec = res.metrics[-1]
    assert set(rec["bytes"]) >= {
        "student->course",
        "course->institution",
        "institution->region",
        "region->global",
    }
    assert rec["sim_time_s"] > 0 and rec["participants"] > 0
