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


def test_rank_zero_builds_no_adapter_and_trains_the_rest(tmp_path):
    """``model.lora_rank=0``: no adapter component, the whole backbone frozen, and a run
    trains encoders, prompts and heads; ``model.lora_targets`` may then be empty."""
    from hierfed.simulation import run

    over = tiny_overrides(
        **{"runtime.name": "local", "model.lora_rank": 0, "model.lora_targets": "[]", "rounds": 1}
    )
    cfg = load_config(None, over, out=str(tmp_path))
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    assert ADAPTER not in spec.components and not any(
        "lora_" in n for n, _ in model.backbone.named_parameters()
    )
    assert all(ADAPTER not in spec.holds(c) for c in fed.clients)
    result = run(cfg, write=False)
    assert set(result.final_state) == set(spec.components)
    start = model.component_state()
    changed = [
        c
        for c in start
        if any(not torch.equal(result.final_state[c][k], start[c][k]) for k in start[c])
    ]
    assert {c.split(".")[0] for c in changed} == {"encoder", "head", "prompt"}


def test_rank_zero_never_imports_peft():
    """peft (and transformers behind it) costs ~3 s of import per process; a run without
    adapters must not load it. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from hierfed.config import load_config\n"
        "from hierfed.model.m3t import build_model\n"
        "from hierfed.simulation import build_federation\n"
        "from hierfed.runtime.worker import WorkerCore\n"
        "from tests.conftest import tiny_overrides\n"
        "cfg = load_config(None, tiny_overrides(**{'model.lora_rank': 0}))\n"
        "build_model(cfg.model, build_federation(cfg), cfg.seed)\n"
        "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_lora_rank_is_checked_and_targets_required_only_with_an_adapter():
    import pytest

    from hierfed.config import validate_config
    from hierfed.errors import ConfigError

    with pytest.raises(ConfigError, match="model.lora_rank"):
        validate_config(load_config(None, tiny_overrides(**{"model.lora_rank": -1})))
    with pytest.raises(ConfigError, match="model.lora_targets"):
        validate_config(load_config(None, tiny_overrides(**{"model.lora_targets": "[]"})))
    with pytest.raises(ConfigError, match="model.resource_ranks"):
        validate_config(
            load_config(
                None,
                tiny_overrides(**{"model.lora_rank": 0, "model.resource_ranks": "{full: 2}"}),
            )
        )


def test_a_run_builds_the_model_only_where_it_trains(tmp_path, monkeypatch):
    """The driver takes the spec and initial state from worker 0: with the in-process
    runtime, one run builds exactly one model, and gets the same result as before."""
    from hierfed.model import m3t
    from hierfed.simulation import run

    built = []
    original = m3t.M3TModel.__init__

    def counting(self, **kw):
        built.append(1)
        original(self, **kw)

    monkeypatch.setattr(m3t.M3TModel, "__init__", counting)
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local", "rounds": 1}))
    result = run(cfg, write=False)
    assert len(built) == 1
    fed = build_federation(cfg)
    spec = model_spec(build_model(cfg.model, fed, cfg.seed), fed, cfg.model)
    assert set(result.final_state) == set(spec.components)
