"""Validation rejects malformed updates with a reason, before anything merges them."""

from __future__ import annotations

import pytest
import torch

from hierfed.errors import UpdateRejected
from hierfed.model.spec import ComponentSpec, ModelSpec
from hierfed.postprocess.validate import Expectation, validate_update
from hierfed.update import Update, UpdateMeta

SPEC = ModelSpec(
    components={
        "head.t": ComponentSpec("head.t", "head", "global", (("bias", (2,)), ("weight", (2, 3)))),
        "encoder.x": ComponentSpec("encoder.x", "encoder", "global", (("w", (3,)),)),
    },
    tier_names=("global", "student"),
    resources={"full": ("*",)},
)
EXPECT = Expectation("s1", frozenset({"head.t", "encoder.x"}), exact=True, max_weight=50.0)


def good(**over):
    tensors = {
        "head.t": {"bias": torch.zeros(2), "weight": torch.ones(2, 3)},
        "encoder.x": {"w": torch.ones(3)},
    }
    weights = {"head.t": 10.0, "encoder.x": 10.0}
    tensors.update(over.pop("tensors", {}))
    weights.update(over.pop("weights", {}))
    return Update(tensors, weights, UpdateMeta(("s1",), 1, 10))


def test_a_good_update_passes():
    validate_update(good(), EXPECT, SPEC)


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (good(tensors={"encoder.x": {"w": torch.tensor([1.0, float("nan"), 0.0])}}), "NaN or Inf"),
        (good(tensors={"encoder.x": {"w": torch.tensor([1.0, float("inf"), 0.0])}}), "NaN or Inf"),
        (good(tensors={"encoder.x": {"w": torch.ones(1, 3)}}), "shape"),  # would broadcast: refused
        (good(tensors={"encoder.x": {"w": torch.ones(4)}}), "shape"),
        (
            good(tensors={"encoder.x": {"w": torch.ones(3), "extra": torch.ones(1)}}),
            "parameter keys",
        ),
        (good(tensors={"head.t": {"weight": torch.ones(2, 3)}}), "parameter keys"),
        (good(tensors={"encoder.x": {"w": torch.ones(3, dtype=torch.int64)}}), "floating point"),
        (good(weights={"head.t": -1.0}), "weight"),
        (good(weights={"head.t": 0.0}), "weight"),
        (good(weights={"head.t": float("nan")}), "weight"),
        (good(weights={"head.t": 1e9}), "exceeds"),
    ],
)
def test_malformed_updates_are_rejected_with_the_reason(update, reason):
    with pytest.raises(UpdateRejected, match=reason) as info:
        validate_update(update, EXPECT, SPEC)
    assert info.value.sender == "s1"


def test_missing_and_extra_components_are_rejected():
    u = good()
    missing = Update({"head.t": u.tensors["head.t"]}, {"head.t": 10.0}, u.meta)
    with pytest.raises(UpdateRejected, match="missing"):
        validate_update(missing, EXPECT, SPEC)
    extra = Update(
        {**u.tensors, "head.z": {"w": torch.ones(1)}}, {**u.weights, "head.z": 1.0}, u.meta
    )
    with pytest.raises(UpdateRejected, match="extra"):
        validate_update(extra, EXPECT, SPEC)
    # a tier node may send a subset, never an unknown component
    loose = Expectation("i1", frozenset({"head.t", "encoder.x"}), exact=False, max_weight=50.0)
    validate_update(missing, loose, SPEC)
    with pytest.raises(UpdateRejected, match="unexpected"):
        validate_update(extra, loose, SPEC)
