"""The M3T model: components, the peft boundary, the frozen backbone, client subsets."""

from __future__ import annotations

import torch

from hierfed.client import ClientTrainer
from hierfed.config import load_config
from hierfed.model.m3t import ADAPTER, build_model, model_spec
from hierfed.simulation import build_federation
from tests.conftest import tiny_overrides


def _setup():
    cfg = load_config(None, tiny_overrides())
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    return cfg, fed, model, model_spec(model, fed, cfg.model)


def test_components_are_named_as_designed_and_exclude_the_backbone():
    _, fed, model, spec = _setup()
    names = set(spec.components)
    assert ADAPTER in names
    assert {f"encoder.{m}" for m in fed.modalities} <= names
    assert {f"head.{t}" for t in fed.tasks} <= names
    assert {f"prompt.{t}" for t in fed.tasks} <= names
    adapter_keys = set(dict(spec.components[ADAPTER].shapes))
    assert adapter_keys and all("lora_" in k for k in adapter_keys)
    # the peft boundary: exactly the keys get_peft_model_state_dict gives, nothing of the base
    from peft import get_peft_model_state_dict

    assert adapter_keys == set(get_peft_model_state_dict(model.backbone))
    assert spec.backbone_numel > 0
    assert all(
        not p.requires_grad for n, p in model.backbone.named_parameters() if "lora_" not in n
    )


def test_same_seed_builds_the_same_model_different_seed_does_not():
    cfg, fed, m1, _ = _setup()
    m2 = build_model(cfg.model, fed, cfg.seed)
    m3 = build_model(cfg.model, fed, cfg.seed + 1)
    s1, s2, s3 = (m.state_dict() for m in (m1, m2, m3))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_client_without_a_modality_neither_builds_nor_trains_its_encoder():
    cfg, fed, model, spec = _setup()
    no_image = next(c for c in fed.clients if "image" not in c.modalities)
    holds = spec.holds(no_image)
    assert "encoder.image" not in holds and "head.digit" not in holds
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    start = model.component_state()
    fit = trainer.fit(
        data=fed.train[no_image.id],
        tasks=no_image.tasks,
        start=start,
        trainable=holds,
        key=(1, no_image.id),
    )
    assert set(fit.state) == set(holds)
    after = model.component_state()
    assert torch.equal(after["encoder.image"]["proj.weight"], start["encoder.image"]["proj.weight"])
    changed = [
        c for c in holds if any(not torch.equal(fit.state[c][p], start[c][p]) for p in fit.state[c])
    ]
    assert set(changed) == set(holds)


def test_backbone_stays_frozen_and_in_eval_mode_through_training():
    cfg, fed, model, spec = _setup()
    before = {
        n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" not in n
    }
    client = fed.clients[0]
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    model.train()
    assert not model.backbone.training
    trainer.fit(
        data=fed.train[client.id],
        tasks=client.tasks,
        start=model.component_state(),
        trainable=spec.holds(client),
        key=(1, client.id),
    )
    for n, p in model.backbone.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    assert not model.backbone.training


def test_light_clients_train_heads_and_prompts_only():
    _, fed, _, spec = _setup()
    from dataclasses import replace

    light = replace(fed.clients[0], resource="light")
    assert all(c.startswith(("head.", "prompt.")) for c in spec.holds(light))


def test_lora_dropout_is_live_in_training_and_keyed(tmp_path):
    from hierfed.simulation import run

    def final(p: float):
        cfg = load_config(
            None,
            tiny_overrides(**{"runtime.name": "local", "model.lora_dropout": p, "rounds": 1}),
            out=str(tmp_path / str(p)),
        )
        return run(cfg, write=False).final_state["adapter.backbone"]

    a, b, off = final(0.3), final(0.3), final(0.0)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same dropout masks
    assert any(not torch.equal(a[k], off[k]) for k in a)  # and the dropout really acts
    cfg = load_config(None, tiny_overrides(**{"model.lora_dropout": 0.3}))
    model = build_model(cfg.model, build_federation(cfg), cfg.seed)
    model.train()
    drops = [m for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.training for m in drops)
    assert not model.backbone.training
