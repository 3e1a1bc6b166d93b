"""DP-SGD: per-sample gradients of LoRA layers, what one DP step touches, clipping, budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hierfed.privacy.dpsgd as dpsgd
from hierfed.client import ClientTrainer, _batch, task_loss
from hierfed.config import load_config
from hierfed.errors import UpdateRejected
from hierfed.model.m3t import build_model, model_spec
from hierfed.postprocess.base import PostContext
from hierfed.privacy.dpsgd import DPSpec, fit_dp, per_sample_grads, train_client
from hierfed.privacy.gaussian import GaussianMechanism
from hierfed.privacy.policy import DPPlan
from hierfed.seeding import torch_gen
from hierfed.simulation import build_federation, run
from hierfed.update import Update, state_norm, state_sub
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local"}))
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    prof = next(c for c in fed.clients if "image" in c.modalities)
    return cfg, fed, model, spec, prof


def test_lora_per_sample_grads_match_one_at_a_time(setup):
    cfg, fed, model, spec, prof = setup
    comps = spec.holds(prof)
    params = model.set_trainable(comps)
    ids = {id(p) for p in params}
    named = {n: p for n, p in model.named_parameters() if id(p) in ids}
    lora = [n for n in named if "lora_" in n]
    assert lora and any("prompt" in n for n in named) and any("type_embed" in n for n in named)
    data = fed.train[prof.id]
    for task in ("digit", "essay_grade"):
        tspec = model.tasks[task]
        idx = np.arange(5)
        inputs, y = _batch(data, idx, tspec.modalities, task)
        grads, losses = per_sample_grads(model, named, inputs, y, task)
        for i in range(5):
            model.zero_grad(set_to_none=True)
            loss = task_loss(
                tspec, model({m: v[i : i + 1] for m, v in inputs.items()}, task), y[i : i + 1]
            )
            loss.backward()
            assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
            for n, p in named.items():
                ref = p.grad if p.grad is not None else torch.zeros_like(p)
                assert torch.allclose(grads[n][i], ref, atol=1e-6, rtol=1e-4), (task, n)
        # the LoRA B factors start at zero, so their per-sample grads must be non-trivial
        assert any(float(grads[n].abs().sum()) > 0 for n in lora if "lora_B" in n)
    model.zero_grad(set_to_none=True)


def test_opacus_hook_grad_samples_of_peft_lora_match(setup):
    # the Opacus hook path (GradSampleModule) on the LoRA-injected backbone: a known
    # silent-corruption pitfall between some Opacus and peft versions — pinned here
    from opacus import GradSampleModule

    cfg, fed, model, spec, prof = setup
    model.set_trainable(["adapter.backbone"])
    bb = model.backbone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, bb.d_model, generator=g)
    mask = torch.ones(4, 6, dtype=torch.bool)
    # Opacus's hooks capture activations only of modules in training mode; our backbone is
    # frozen *and* in eval mode, so only the LoRA factor layers are switched to train here
    # (they hold no dropout or norm, so the mode changes nothing else)
    lora_layers = [
        m for n, m in bb.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))
    ]
    assert lora_layers
    for m in lora_layers:
        m.train()
    gsm = GradSampleModule(bb, loss_reduction="sum")
    try:
        gsm(x, mask).pow(2).sum().backward()
        named = {n: p for n, p in bb.named_parameters() if p.requires_grad}
        samples = {n: p.grad_sample.clone() for n, p in named.items()}
    finally:
        gsm._close()
        bb.eval()
    for p in named.values():
        p.grad = None
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    for i in range(4):
        bb.zero_grad(set_to_none=True)
        bb(x[i : i + 1], mask[i : i + 1]).pow(2).sum().backward()
        for n, p in named.items():
            assert torch.allclose(samples[n][i], p.grad, atol=1e-5, rtol=1e-4), n
    bb.zero_grad(set_to_none=True)


def _plan(
    steps: int, *, sigma: float = 1.0, clip: float = 1.0, q: float = 0.5, eps: float = 100.0
) -> DPPlan:
    return DPPlan("p", eps, 1e-5, clip, sigma, q, steps, 10)


def test_one_dp_step_changes_every_trainable_tensor_and_no_frozen_one(setup):
    cfg, fed, model, spec, prof = setup
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    # a subset: head.essay_topic gets no gradient from a digit batch, only DP noise
    comps = ["adapter.backbone", "encoder.image", "head.digit", "head.essay_topic", "prompt.digit"]
    start = model.component_state()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    fit, hist = fit_dp(
        trainer,
        data=fed.train[prof.id],
        tasks=["digit"],
        start=start,
        trainable=comps,
        key=(1, prof.id),
        dp=DPSpec(_plan(1)),
    )
    assert fit.steps == 1 and hist == ((1.0, 0.5, 1),)
    for c in comps:
        for p, t in fit.state[c].items():
            assert not torch.equal(t, start[c][p]), f"{c}/{p} did not change"
    trained = {id(p) for c in comps for p in model.component_parameters(c)}
    for n, p in model.named_parameters():
        if "lora_" in n or id(p) in trained:
            continue
        assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    assert not model.backbone.training  # the frozen backbone stays in eval mode
    # untouched components (not trainable for this client) are bit-identical too
    others = [c for c in model.component_names() if c not in comps]
    after = model.component_state(others)
    assert others and state_norm(state_sub(after, start)) == 0.0
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())


def test_dp_update_norm_is_bounded_by_clip_without_noise(setup):
    # sgd lr=1, no noise, every row sampled (q=1): the step is minus the mean of clipped
    # per-sample gradients, so its norm cannot exceed the clip bound
    cfg, fed, model, spec, prof = setup
    from dataclasses import replace

    trainer = ClientTrainer(model, replace(cfg.train, optimizer="sgd", lr=1.0), cfg.seed)
    comps = spec.holds(prof)
    start = model.component_state()
    for clip in (0.05, 0.5):
        fit, _ = fit_dp(
            trainer,
            data=fed.train[prof.id],
            tasks=["dropout_risk"],
            start=start,
            trainable=comps,
            key=(2, prof.id),
            dp=DPSpec(_plan(1, sigma=0.0, clip=clip, q=1.0)),
        )
        delta = state_sub(fit.state, start)
        assert 0 < state_norm(delta) <= clip * (1 + 1e-5)


def test_fedprox_pulls_the_private_step_towards_the_start(setup):
    # sgd lr=1, no noise, every row sampled: step 1 is p1 = p0 - g0 either way; with mu=1
    # step 2 is p1 - (g1 + (p1 - p0)) = p0 - g1, without it p1 - g1. So the two 2-step results
    # differ by exactly the first step, p1 - p0 (before this, the proximal term was ignored)
    cfg, fed, model, spec, prof = setup
    from dataclasses import replace

    assert cfg.model.lora_dropout == 0  # same rows and no dropout: both runs see the same g0, g1
    comps = spec.holds(prof)
    start = model.component_state()
    kw = dict(data=fed.train[prof.id], tasks=["dropout_risk"], start=start, trainable=comps)
    base = replace(cfg.train, optimizer="sgd", lr=1.0, momentum=0.0, local_epochs=1)

    def fit(mu: float, steps: int):
        trainer = ClientTrainer(model, replace(base, fedprox_mu=mu), cfg.seed)
        plan = _plan(steps, sigma=0.0, clip=0.5, q=1.0)
        return fit_dp(trainer, key=(4, prof.id), dp=DPSpec(plan), **kw)[0].state

    one = state_sub(fit(0.0, 1), start)
    gap = state_sub(fit(0.0, 2), fit(1.0, 2))
    assert state_norm(one) > 0
    assert state_norm(state_sub(gap, one)) <= 1e-5 * state_norm(one)


@settings(max_examples=30, deadline=None)
@given(
    vals=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=8),
    w=st.floats(0.5, 50),
    clip=st.floats(0.01, 10),
)
def test_gaussian_postprocessor_clips_to_bound(vals, w, clip):
    u = Update.from_delta({"head.t": {"w": torch.tensor(vals)}}, w, sender="s", round=1)
    out = GaussianMechanism({"clip": clip, "noise_multiplier": 0.0}).process(
        u, PostContext("s", "p", "institution", 1, 0)
    )
    assert state_norm(out.mean()) <= clip * (1 + 1e-5)
    assert out.weights == u.weights


def test_gaussian_noise_std_and_keying():
    u = Update.from_delta({"head.t": {"w": torch.zeros(20000)}}, 3.0, sender="s", round=1)
    g = GaussianMechanism({"clip": 0.5, "noise_multiplier": 2.0})
    a = g.process(u, PostContext("s", "p", "institution", 1, 0)).mean()["head.t"]["w"]
    b = g.process(u, PostContext("s", "p", "institution", 1, 0)).mean()["head.t"]["w"]
    c = g.process(u, PostContext("s", "p", "institution", 2, 0)).mean()["head.t"]["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)  # keyed by (seed, round, sender)
    assert float(a.std()) == pytest.approx(1.0, rel=0.03)  # std = noise_multiplier x clip


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_rejected_before_clipping(bad):
    u = Update.from_delta({"head.t": {"w": torch.tensor([1.0, bad])}}, 1.0, sender="s", round=1)
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        GaussianMechanism({"clip": 1.0, "noise_multiplier": 0.0}).process(
            u, PostContext("s", "p", "institution", 1, 0)
        )


def test_spent_budget_stops_the_client(setup):
    cfg, fed, model, spec, prof = setup
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    comps = spec.holds(prof)
    from hierfed.privacy.accountant import epsilon_of

    plan = _plan(2, sigma=1.0, q=0.5)
    budget = epsilon_of(((1.0, 0.5, 4),), 1e-5)  # exactly two participations of 2 steps
    plan = DPPlan("p", budget, 1e-5, 1.0, 1.0, 0.5, 2, 2)
    state = None
    kw = dict(
        data=fed.train[prof.id],
        tasks=["digit", "dropout_risk"],
        start=model.component_state(),
        trainable=comps,
    )
    for r in (1, 2):
        fit, state = train_client(trainer, plan=plan, prior=state, key=(r, prof.id), **kw)
        assert fit is not None and state.status == "ok" and state.participations == r
    assert state.epsilon == pytest.approx(budget)
    fit, state3 = train_client(trainer, plan=plan, prior=state, key=(3, prof.id), **kw)
    assert fit is None and state3.status == "budget_spent" and state3.history == state.history


def test_three_institutions_three_budgets_in_a_run(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "runtime.name": "local",
                "rounds": 2,
                "data.samples_per_student": 16,
                "train.batch_size": 8,
                "data.students_per_institution": 2,
                "privacy.policies.strict.epsilon": 1.0,
                "privacy.policies.strict.rounds": 1,
                "privacy.policies.mid.epsilon": 4.0,
                "privacy.policies.loose.epsilon": 16.0,
                "privacy.assign.global/inst-00/*": "strict",
                "privacy.assign.global/inst-01/*": "mid",
                "privacy.assign.global/inst-02/*": "loose",
            }
        ),
        out=str(tmp_path / "run"),
    )
    res = run(cfg, write=False)
    r1, r2 = res.metrics[1], res.metrics[2]
    d1, d2 = r1["dp_sample"], r2["dp_sample"]
    assert d1["unit"] == d2["unit"] == "sample"
    assert len(d2["clients"]) == 6 and d1["sat_out"] == []
    strict = sorted(c for c in d2["clients"] if "/inst-00/" in c)
    assert d2["sat_out"] == strict and d2["spent"] == strict  # strict's budget fit one round
    assert r2["participants"] == r1["participants"] - len(strict)
    for c, rep in d2["clients"].items():
        budget = {"inst-00": 1.0, "inst-01": 4.0, "inst-02": 16.0}[c.split("/")[1]]
        assert rep["delta"] == 1e-5 and rep["budget"] == budget and rep["epsilon"] <= budget
        if "/inst-00/" not in c:  # cumulative: the second round adds to the first
            assert rep["participations"] == 2 and rep["epsilon"] > d1["clients"][c]["epsilon"]
            assert (
                rep["epsilon"] >= 0.98 * budget
            )  # the derived noise spends the budget in the planned rounds
    assert math.isfinite(r2["train_loss"])


def test_dp_sgd_with_lora_dropout_is_keyed_and_really_drops():
    """LoRA's own dropout trains under DP-SGD too (the torch.func per-sample path): the same key
    gives the same result bit for bit, and the result differs from the run without dropout."""
    results = {}
    for p in (0.0, 0.3):
        cfg = load_config(
            None, tiny_overrides(**{"runtime.name": "local", "model.lora_dropout": p})
        )
        fed = build_federation(cfg)
        model = build_model(cfg.model, fed, cfg.seed)
        spec = model_spec(model, fed, cfg.model)
        prof = next(c for c in fed.clients if "image" in c.modalities)
        trainer = ClientTrainer(model, cfg.train, cfg.seed)
        start = model.component_state()
        kw = dict(data=fed.train[prof.id], tasks=["digit"], start=start, trainable=spec.holds(prof))
        plan = DPSpec(_plan(3, sigma=0.0, clip=1.0, q=1.0))  # no noise: only dropout can differ
        runs = [fit_dp(trainer, key=(5, prof.id), dp=plan, **kw)[0].state for _ in range(2)]
        assert state_norm(state_sub(runs[0], runs[1])) == 0.0  # keyed: bit-identical
        assert state_norm(state_sub(runs[0], start)) > 0
        results[p] = runs[0]
    assert state_norm(state_sub(results[0.3], results[0.0])) > 0


# ---------------------------------------------------------------- on the worker's device (issue 14)


def _fit_on(trainer, setup, start, steps=3):
    _, fed, _, _, prof = setup
    # q = 0.5 of 24 rows: an empty Poisson batch has probability 2**-24 per step
    plan = DPPlan("p", 100.0, 1e-5, 1.0, 1.0, 0.5, steps, 10)
    return fit_dp(
        trainer,
        data=fed.train[prof.id],
        tasks=["digit"],
        start=start,
        trainable=["encoder.image", "head.digit", "prompt.digit"],
        key=(1, prof.id),
        dp=DPSpec(plan),
    )


def test_dp_sgd_builds_every_batch_on_the_trainers_device(setup, monkeypatch):
    """Every batch fit_dp hands the model is built for ``trainer.device`` (a GPU worker's
    ``cuda:0``); CPU is used here, so the spy sees the device asked for, and a fit_dp that
    drops it again (builds on the default, the CPU) is caught: it would record None."""
    cfg, _, model, _, _ = setup
    start = model.component_state()
    seen: list[torch.device | None] = []
    real = dpsgd._batch

    def spy(data, idx, modalities, task, device=None):
        seen.append(device)
        return real(data, idx, modalities, task, device)

    monkeypatch.setattr(dpsgd, "_batch", spy)
    device = torch.device("cpu")
    fit, _ = _fit_on(ClientTrainer(model, cfg.train, cfg.seed, device), setup, start)
    assert fit.steps == 3 and seen == [device] * 3


def test_dp_sgd_state_comes_back_on_the_cpu_and_the_cpu_result_is_unchanged(setup, monkeypatch):
    """The trained state leaves through ``to_cpu`` (as ClientTrainer.fit's does on a GPU), and
    naming the CPU as the device changes no bit of the result."""
    cfg, _, model, _, _ = setup
    start = model.component_state()
    moved: list[object] = []
    real = dpsgd.to_cpu

    def spy(state):
        out = real(state)
        moved.append(out)
        return out

    monkeypatch.setattr(dpsgd, "to_cpu", spy)
    on_cpu, hist = _fit_on(
        ClientTrainer(model, cfg.train, cfg.seed, torch.device("cpu")), setup, start
    )
    assert len(moved) == 1 and on_cpu.state is moved[0]
    assert all(t.device.type == "cpu" for p in on_cpu.state.values() for t in p.values())
    plain, hist0 = _fit_on(ClientTrainer(model, cfg.train, cfg.seed), setup, start)
    assert hist == hist0 and on_cpu.loss == plain.loss
    for c, params in plain.state.items():
        for k, t in params.items():
            assert torch.equal(t, on_cpu.state[c][k]), f"{c}/{k}"


def test_dp_noise_generator_on_the_cpu_draws_what_torch_gen_draws():
    # the CPU results (and the pinned digests) keep their noise; on a GPU it is drawn there
    a = dpsgd.noise_generator(torch.device("cpu"), 7, "k", "dp-noise")
    b = torch_gen(7, "k", "dp-noise")
    assert a.device == torch.device("cpu")
    assert torch.equal(torch.normal(0.0, 1.0, (5,), generator=a), torch.randn(5, generator=b))
