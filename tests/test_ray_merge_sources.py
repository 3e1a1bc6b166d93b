"""A merging Ray worker is sent the update objects that hold its nodes' senders, not every
update of the round (``RayRuntime.sources_for``); results are unchanged (the bit-identity
tests in test_integration_ray.py and test_failures.py run through it)."""

from __future__ import annotations

import pytest

from hierfed.config import load_config
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import MergeTask
from hierfed.runtime.ray import RayRuntime
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray


def _task(node: str, *senders: str) -> MergeTask:
    exps = tuple(Expectation(s, frozenset({"head.t"}), True, 10.0) for s in senders)
    return MergeTask(
        node_id=node, tier="institution", round=1, key=(1,), expectations=exps, state={}
    )


def test_a_merging_worker_gets_only_the_objects_holding_its_senders(ray_session):
    rt = RayRuntime(load_config(None, tiny_overrides()).runtime)
    a, b, late = (ray_session.put({k: k}) for k in ("a", "b", "late"))
    rt._holds = {a.hex(): (1, frozenset({"s1", "s2"})), b.hex(): (1, frozenset({"s3"}))}
    inline = {"s2": "u2", "s3": "u3", "i9": "u9"}
    sources = [a, b, late, inline]
    # s1's object, the object of unknown holdings (e.g. a late update), s2's inline entry
    assert rt.sources_for([_task("i0", "s1"), _task("i1", "s2")], sources) == [
        a,
        late,
        {"s2": "u2"},
    ]
    assert rt.sources_for([_task("i2", "s3")], sources) == [b, late, {"s3": "u3"}]
    # a node expecting nobody still gets what cannot be ruled out, nothing else
    assert rt.sources_for([_task("i3")], sources) == [late, {}]
