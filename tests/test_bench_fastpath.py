"""The M3T component fast path (live-parameter index) behaves exactly like the peft/state_dict path."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model_state_dict

from hierfed.config import load_config
from hierfed.model.m3t import ADAPTER, build_model
from hierfed.simulation import build_federation
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def model_and_fed():
    cfg = load_config(None, tiny_overrides())
    fed = build_federation(cfg)
    return build_model(cfg.model, fed, cfg.seed), fed


def test_component_state_matches_peft_and_is_a_copy(model_and_fed):
    model, _ = model_and_fed
    state = model.component_state()
    peft_sd = get_peft_model_state_dict(model.backbone)
    assert list(state[ADAPTER]) == list(peft_sd)
    for k, v in peft_sd.items():
        assert torch.equal(state[ADAPTER][k], v)
    state[ADAPTER][next(iter(peft_sd))].add_(1.0)  # mutating the copy leaves the model alone
    assert torch.equal(
        model.component_state()[ADAPTER][next(iter(peft_sd))], peft_sd[next(iter(peft_sd))]
    )


def test_load_components_round_trips_every_component(model_and_fed):
    model, _ = model_and_fed
    before = model.component_state()
    shifted = {c: {k: v + 0.5 for k, v in p.items()} for c, p in before.items()}
    model.load_components(shifted)
    after = model.component_state()
    for c in before:
        for k in before[c]:
            assert torch.equal(after[c][k], shifted[c][k])
    peft_sd = get_peft_model_state_dict(
        model.backbone
    )  # the adapter really changed inside peft's layers
    for k, v in peft_sd.items():
        assert torch.equal(v, shifted[ADAPTER][k])
    model.load_components(before)


def test_load_components_still_rejects_unknown_adapter_keys(model_and_fed):
    model, _ = model_and_fed
    state = model.component_state([ADAPTER])
    bad = {ADAPTER: {**state[ADAPTER], "not.a.lora_A.weight": torch.zeros(2, 2)}}
    with pytest.raises(ValueError, match="unexpected keys"):
        model.load_components(bad)
