"""Resource-aware participation (issue 18): ``sampling: by_resource`` keeps every resource
class represented in a node's sample; ``uniform`` (the default) is unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hierfed.config import load_config
from hierfed.engine.sampling import sample, sample_size, seats
from hierfed.errors import ConfigError
from hierfed.simulation import build_federation, run
from tests.conftest import tiny_overrides


def test_seats_by_hand():
    assert seats(4, {"full": 6, "light": 2}) == {"full": 3, "light": 1}  # 3.0 and 1.0
    assert seats(3, {"full": 98, "light": 2}) == {"full": 2, "light": 1}  # the light one kept
    assert seats(1, {"full": 5, "light": 5}) == {"full": 1, "light": 0}  # one seat, tie by name
    assert seats(10, {"a": 1, "b": 20}) == {"a": 1, "b": 9}


@given(
    counts=st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 30), min_size=1),
    frac=st.floats(0.01, 1.0),
)
def test_seats_fill_every_seat_within_each_class_and_keep_every_class(counts, frac):
    m = sample_size(frac, sum(counts.values()))
    out = seats(m, counts)
    assert sum(out.values()) == m
    assert all(0 <= out[c] <= counts[c] for c in counts)
    if m >= len(counts):
        assert all(out[c] >= 1 for c in counts)


def test_stratified_sample_is_keyed_and_keeps_each_class():
    members = [f"s{i:02d}" for i in range(12)]
    classes = {c: ("light" if i < 2 else "full") for i, c in enumerate(members)}
    draws = [
        sample(seed=0, node="n", members=members, p=0.25, rnd=r, key=(0,), classes=classes)
        for r in range(1, 30)
    ]
    assert all(len(d) == 3 and sum(classes[c] == "light" for c in d) == 1 for d in draws)
    again = sample(seed=0, node="n", members=members, p=0.25, rnd=1, key=(0,), classes=classes)
    assert again == draws[0]
    # uniformly, the two light clients are left out of most 3-of-12 samples
    plain = [
        sample(seed=0, node="n", members=members, p=0.25, rnd=r, key=(0,)) for r in range(1, 30)
    ]
    assert sum(any(classes[c] == "light" for c in d) for d in plain) < len(plain)


def _cfg(**extra):
    over = {
        "runtime.name": "local",
        "rounds": 3,
        "data.students_per_institution": 8,
        "data.options.resource_mix": "{light: 0.25, full: 0.75}",
        "topology.tiers.institution.participation": 0.25,
        **extra,
    }
    return load_config(None, tiny_overrides(**over), topology="hierarchical")


def test_every_institution_trains_a_light_student_every_round():
    cfg = _cfg(**{"topology.tiers.institution.sampling": "by_resource"})
    fed = build_federation(cfg)
    light = {c.id for c in fed.clients if c.resource == "light"}
    res = run(cfg, write=False)
    for rnd in (1, 2, 3):
        up = {
            r.src for r in res.ledger.records if r.round == rnd and r.edge == "student->institution"
        }
        for inst in sorted({c.path[1] for c in fed.clients}):
            mine = {c for c in light if c.split("/")[1] == inst}
            if mine:
                assert up & mine, f"round {rnd}: no light student of {inst} took part"


def test_by_resource_on_a_tier_of_tier_nodes_is_refused_before_work():
    with pytest.raises(ConfigError, match="global.sampling"):
        run(_cfg(**{"topology.tiers.global.sampling": "by_resource"}), write=False)
    with pytest.raises(ConfigError, match="sampling"):
        _cfg(**{"topology.tiers.institution.sampling": "by_size"})
