"""edu-synth: deterministic, non-IID, with missing modalities and an essay-only institution."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.simulation import build_federation


def test_same_seed_same_data_different_seed_different_data():
    a = build_federation(load_config())
    b = build_federation(load_config())
    c = build_federation(load_config(None, ["seed=1"]))
    cid = a.clients[0].id
    assert np.array_equal(a.train[cid].inputs["tabular"], b.train[cid].inputs["tabular"])
    assert not np.array_equal(a.train[cid].inputs["tabular"], c.train[cid].inputs["tabular"])


def test_structure_tiers_tasks_and_heterogeneity():
    fed = build_federation(load_config())
    assert fed.tier_names == ("global", "institution", "student")
    assert len(fed.tasks) >= 3
    assert any(len(t.modalities) >= 2 for t in fed.tasks.values())
    assert any("image" not in c.modalities for c in fed.clients)
    essay_only = [c for c in fed.clients if set(c.tasks) == {"essay_grade", "essay_topic"}]
    assert essay_only
    # size skew: students differ in how much data they hold
    sizes = [c.num_train for c in fed.clients]
    assert max(sizes) > 1.5 * min(sizes)
    # label skew: institutions' digit distributions differ
    by_inst: dict[str, np.ndarray] = {}
    for c in fed.clients:
        if "digit" in c.tasks:
            inst = c.path[1]
            counts = np.bincount(fed.train[c.id].labels["digit"], minlength=10)
            by_inst[inst] = by_inst.get(inst, np.zeros(10)) + counts
    dists = [v / v.sum() for v in by_inst.values()]
    assert max(np.abs(dists[0] - d).sum() for d in dists[1:]) > 0.3
    # every client's rows carry labels for exactly its tasks and inputs for exactly its modalities
    for c in fed.clients:
        assert set(fed.train[c.id].labels) == set(c.tasks)
        assert set(fed.train[c.id].inputs) == set(c.modalities)
        assert len(fed.train[c.id]) == c.num_train


def test_more_essay_only_institutions_than_institutions_is_refused():
    with pytest.raises(ConfigError, match="essay_only_institutions"):
        load_config(None, ["data.num_institutions=2", "data.essay_only_institutions=2"])
