"""Checks on each input and on the merged result (issue 13, items 2, 3, 4 and receiver clip).

A node-round is a plain function (``merge_node_round``), run here on a hand-made spec: valid
updates whose *sum* overflows, a tiny weight, sparse/meta/float64/float16 tensors and an
aggregator that fails each end as a recorded rejection with the node's state left finite.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from hierfed.config import load_config
from hierfed.errors import UpdateRejected
from hierfed.model.spec import ComponentSpec, ModelSpec
from hierfed.postprocess.validate import MIN_WEIGHT, Expectation, validate_update
from hierfed.runtime.jobs import MergeTask
from hierfed.runtime.merge import merge_node_round
from hierfed.update import Update, UpdateMeta
from tests.conftest import tiny_overrides

SPEC = ModelSpec(
    components={
        "head.t": ComponentSpec("head.t", "head", "global", (("w", (3,)),)),
        "adapter.x": ComponentSpec(
            "adapter.x",
            "adapter",
            "global",
            (("l.lora_A.weight", (2, 4)), ("l.lora_B.weight", (4, 2))),
        ),
    },
    tier_names=("global", "institution", "student"),
    resources={"full": ("*",)},
)
STATE = {
    "head.t": {"w": torch.zeros(3)},
    "adapter.x": {
        "l.lora_A.weight": torch.full((2, 4), 0.1),
        "l.lora_B.weight": torch.full((4, 2), 0.1),
    },
}
SENDERS = [f"global/inst-00/student-00{i}" for i in range(5)]


def cfg_with(**over):
    return load_config(None, tiny_overrides(**over))


def upd(sender, head, weight=1.0, adapter=0.01, dtype=torch.float32):
    tensors = {
        "head.t": {"w": torch.tensor(head, dtype=dtype) * weight},
        "adapter.x": {
            "l.lora_A.weight": torch.full((2, 4), adapter, dtype=dtype) * weight,
            "l.lora_B.weight": torch.full((4, 2), adapter, dtype=dtype) * weight,
        },
    }
    return Update(tensors, {"head.t": weight, "adapter.x": weight}, UpdateMeta((sender,), 1, 1))


def task(senders=SENDERS, state=STATE):
    exps = tuple(
        Expectation(s, frozenset(SPEC.components), exact=True, max_weight=100.0) for s in senders
    )
    return MergeTask("global/inst-00", "institution", 1, (), exps, state)


def finite(state):
    return all(bool(torch.isfinite(t).all()) for p in state.values() for t in p.values())


def test_two_valid_updates_whose_sum_overflows_reject_the_node_round():
    big = 3e38  # finite in float32; two of them are not
    pool = {s: upd(s, [big, 1.0, 1.0]) for s in SENDERS[:2]}
    for s in pool:  # each one passes validation on its own
        validate_update(
            pool[s],
            Expectation(s, frozenset(SPEC.components), exact=True, max_weight=100.0),
            SPEC,
        )
    res = merge_node_round(task(SENDERS[:2]), pool, cfg=cfg_with(), spec=SPEC)
    assert res.state is STATE and finite(res.state)  # the node keeps its state
    assert res.weights == {} and res.accepted == ()
    ((who, why),) = res.rejected
    assert who == "global/inst-00" and "overflows" in why and "head.t/w" in why


def test_an_honest_sum_still_merges_and_default_means_are_unchanged():
    pool = {s: upd(s, [1.0, 2.0, 3.0], weight=w) for s, w in zip(SENDERS[:2], (1.0, 3.0))}
    res = merge_node_round(task(SENDERS[:2]), pool, cfg=cfg_with(), spec=SPEC)
    assert res.rejected == () and res.weights == {"head.t": 4.0, "adapter.x": 4.0}
    assert res.state["head.t"]["w"].tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "aggregator", ["norm_bounded", "trimmed_mean", "noise_aware", "lora_exact", "weighted_mean"]
)
def test_a_tiny_weight_is_rejected_with_a_reason_and_the_rest_merge(aggregator):
    opts = {"topology.tiers.institution.aggregator": aggregator}
    pool = {s: upd(s, [1.0, 1.0, 1.0], weight=2.0) for s in SENDERS}
    tiny = SENDERS[0]
    pool[tiny] = upd(tiny, [1.0, 1.0, 1.0], weight=1e-200)
    res = merge_node_round(task(), pool, cfg=cfg_with(**opts), spec=SPEC)
    assert "weight 1e-200 is below the minimum" in dict(res.rejected)[tiny]
    assert tiny not in res.accepted and len(res.accepted) == 4
    assert finite(res.state)
    assert res.state["head.t"]["w"].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_weight_bounds_hold_on_both_sides():
    e = Expectation("s", frozenset(SPEC.components), exact=True, max_weight=10.0)
    validate_update(upd("s", [1.0, 1.0, 1.0], weight=MIN_WEIGHT), e, SPEC)  # the bound itself
    for w, needle in ((MIN_WEIGHT / 2, "below the minimum"), (11.0, "exceeds")):
        with pytest.raises(UpdateRejected, match=needle):
            validate_update(upd("s", [1.0, 1.0, 1.0], weight=w), e, SPEC)
    # a mean that overflows float32 even though tensor and weight are finite
    with pytest.raises(UpdateRejected, match="overflows"):
        u = upd("s", [1.0, 1.0, 1.0], weight=1e-5)
        loud = {**u.tensors, "head.t": {"w": torch.tensor([3e38, 0.0, 0.0])}}
        validate_update(Update(loud, dict(u.weights), u.meta), e, SPEC)


def _odd(kind: str) -> Update:
    u = upd(SENDERS[0], [1.0, 1.0, 1.0])
    t = dict(u.tensors["head.t"])
    if kind == "sparse":
        t["w"] = torch.tensor([1.0, 0.0, 1.0]).to_sparse()
    elif kind == "meta":
        t["w"] = torch.empty(3, device="meta")
    elif kind == "float64":
        t["w"] = torch.ones(3, dtype=torch.float64)
    elif kind == "float16":
        t["w"] = torch.ones(3, dtype=torch.float16)
    elif kind == "bfloat16":
        t["w"] = torch.ones(3, dtype=torch.bfloat16)
    return Update({**u.tensors, "head.t": t}, dict(u.weights), u.meta)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("sparse", "not a dense"),
        ("meta", "on device meta"),
        ("float64", "dtype torch.float64 != expected torch.float32"),
        ("float16", "dtype torch.float16 != expected torch.float32"),
        ("bfloat16", "dtype torch.bfloat16"),
    ],
)
def test_odd_tensors_are_rejected_not_crashing_not_accepted(kind, reason):
    pool = {s: upd(s, [1.0, 1.0, 1.0]) for s in SENDERS[1:3]}
    pool[SENDERS[0]] = _odd(kind)
    for agg in ("weighted_mean", "lora_exact"):
        cfg = cfg_with(**{"topology.tiers.institution.aggregator": agg})
        res = merge_node_round(task(SENDERS[:3]), pool, cfg=cfg, spec=SPEC)
        assert reason in dict(res.rejected)[SENDERS[0]]
        assert res.state["head.t"]["w"].dtype == torch.float32  # never promoted
        assert set(res.accepted) == set(SENDERS[1:3])


def test_an_aggregator_failure_is_a_recorded_rejection():
    # lora_exact needs the node's value of each adapter; a node state without it makes it raise
    state = {"head.t": {"w": torch.zeros(3)}}
    pool = {s: upd(s, [1.0, 1.0, 1.0]) for s in SENDERS[:3]}
    cfg = cfg_with(**{"topology.tiers.institution.aggregator": "lora_exact"})
    res = merge_node_round(task(SENDERS[:3], state=state), pool, cfg=cfg, spec=SPEC)
    ((who, why),) = res.rejected
    assert who == "global/inst-00" and "aggregator 'lora_exact' failed" in why
    assert res.state is state and res.weights == {}


def test_receiver_side_clip_bounds_a_sender_that_skipped_clipping():
    over = {
        "topology.tiers.institution.postprocess": "[clip]",
        "topology.tiers.institution.postprocess_options.clip.max_norm": 1.0,
        "topology.tiers.institution.postprocess_options.clip.side": "receiver",
    }
    cfg = cfg_with(**over)
    # one honest sender (norm 0) and one that sends a mean delta of norm 50 unclipped
    honest = upd(SENDERS[0], [0.0, 0.0, 0.0], adapter=0.0)
    loud = upd(SENDERS[1], [30.0, 40.0, 0.0], adapter=0.0)
    res = merge_node_round(
        task(SENDERS[:2]), {SENDERS[0]: honest, SENDERS[1]: loud}, cfg=cfg, spec=SPEC
    )
    # clipped to norm 1 -> (0.6, 0.8, 0); mean of the two (weights 1 and 1) -> (0.3, 0.4, 0)
    assert res.state["head.t"]["w"].tolist() == pytest.approx([0.3, 0.4, 0.0])
    # sender-side only (the default) leaves it to the sender: unclipped here
    plain = cfg_with(
        **{**over, "topology.tiers.institution.postprocess_options.clip.side": "sender"}
    )
    res = merge_node_round(
        task(SENDERS[:2]), {SENDERS[0]: honest, SENDERS[1]: loud}, cfg=plain, spec=SPEC
    )
    assert res.state["head.t"]["w"].tolist() == pytest.approx([15.0, 20.0, 0.0])


def test_a_collapsing_run_exits_non_zero_with_a_clear_message(tmp_path):
    """The issue's reproduction on a tiny federation: a scaling attack of 1e30 used to end
    with loss=nan and exit code 0."""
    over = tiny_overrides(
        **{
            "runtime.name": "local",
            "rounds": 2,
            "attack.name": "scaling",
            "attack.fraction": 0.2,
            "attack.options.scale": 1e30,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "hierfed", "run", "--quiet", "--out", str(tmp_path / "r"), *over],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "run stopped after round" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "r" / "final_state.safetensors").exists()


def test_a_non_finite_global_model_stops_the_run():
    from hierfed.errors import RunCollapsed
    from hierfed.health import check_round

    bad = {"head.t": {"w": torch.tensor([1.0, math.inf, 0.0])}}
    with pytest.raises(RunCollapsed, match="NaN or Inf .first: head.t/w"):
        check_round(4, global_state=bad, participants=3, rejections=[], client_ids={"a"})
    with pytest.raises(RunCollapsed, match="every client update was rejected .2 of 2"):
        check_round(
            4,
            global_state=STATE,
            participants=2,
            rejections=[("a", "x: NaN"), ("b", "x: NaN"), ("global/inst-00", "node")],
            client_ids={"a", "b"},
        )
    check_round(
        4, global_state=STATE, participants=2, rejections=[("a", "x")], client_ids={"a", "b"}
    )
