"""CommLedger: records, summaries, and totals equal to the sum of update sizes."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed.ledger import CommLedger
from hierfed.update import Update


def test_summaries_by_edge_component_and_link(tmp_path):
    led = CommLedger()
    led.record(
        round=1,
        src="s1",
        dst="i1",
        edge="student->institution",
        direction="up",
        sizes={"head.a": 40, "enc.x": 8},
    )
    led.record(
        round=1,
        src="i1",
        dst="s1",
        edge="institution->student",
        direction="down",
        sizes={"head.a": 40},
    )
    led.record(
        round=2, src="i1", dst="g", edge="institution->global", direction="up", sizes={"head.a": 40}
    )
    assert led.total() == 128
    assert led.by_edge() == {
        "institution->global": 40,
        "institution->student": 40,
        "student->institution": 48,
    }
    assert led.by_edge(round=2) == {"institution->global": 40}
    assert led.by_component() == {"enc.x": 8, "head.a": 120}
    assert led.by_link()["s1->i1"] == 48
    led.save(tmp_path / "l.csv")
    again = CommLedger.load(tmp_path / "l.csv")
    assert again.records == led.records


def test_bad_direction_is_refused():
    import pytest

    with pytest.raises(ValueError, match="direction"):
        CommLedger().record(
            round=1, src="a", dst="b", edge="e", direction="sideways", sizes={"x": 1}
        )


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(1, 20)), min_size=1, max_size=20))
def test_ledger_total_equals_sum_of_update_sizes(shapes):
    led = CommLedger()
    expected = 0
    for i, (n, m) in enumerate(shapes):
        u = Update.from_delta(
            {"head.t": {"w": torch.zeros(n)}, "enc.x": {"w": torch.zeros(m, 2)}},
            1.0,
            sender=f"c{i}",
            round=1,
        )
        led.record(
            round=1, src=f"c{i}", dst="g", edge="student->global", direction="up", sizes=u.nbytes()
        )
        expected += 4 * n + 4 * 2 * m
    assert led.total() == expected
    assert sum(led.by_component().values()) == expected
