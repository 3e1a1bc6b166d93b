"""Sample-level DP-SGD for one client, on exactly its trainable components, with Opacus.

Per-sample gradients come from ``torch.func`` (``vmap(grad(...))`` over ``functional_call``
of the whole M3T model with only the trainable tensors as inputs) — the same machinery as
Opacus's ``functorch`` grad-sampler mode, applied to the whole model. Why not Opacus's hook
mode (``GradSampleModule``): the soft prompts are ``nn.Parameter``s in a ``ParameterDict``
that is never *called*, and the encoders hold bare ``type_embed`` parameters, so hooks see no
activations for them; and Opacus's hooks record activations only of modules in *training*
mode, while our frozen backbone — LoRA layers inside it — stays in eval mode (hooking it
as is fails with "No activations detected"). The functional route covers every trainable
tensor, LoRA included, whatever the modes; ``tests/test_privacy_dpsgd.py`` checks it against
one-sample-at-a-time gradients, and also checks Opacus's hook path on the peft LoRA layers
(with those layers switched to train mode) against the same reference (opacus 1.6.0, peft
0.21.2: they agree).

Clipping, noise and the mean are Opacus's ``DPOptimizer`` (noise from a generator keyed by
``(seed, round key, client)``); the accounting is Opacus's RDP accountant, fed one entry per
optimizer step and carried across rounds in ``PrivacyState``. Batches are Poisson-sampled
(each row independently with probability ``q``), as the accountant assumes; an empty batch
still takes a (pure-noise) step. The frozen backbone stays in eval mode.

Like ``ClientTrainer.fit``, it runs on the trainer's device (``runtime.gpus_per_worker``):
batches are built there, the noise is drawn there (``noise_generator``), and the trained
state comes back on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from hierfed.client import ClientTrainer, FitResult, _batch, task_loss, to_cpu
from hierfed.data.federation import ClientData
from hierfed.model.m3t import M3TModel
from hierfed.privacy.accountant import PrivacyState, accountant_of, epsilon_of, merge_history
from hierfed.privacy.policy import DPPlan
from hierfed.seeding import derive_seed, np_rng


@dataclass(frozen=True)
class DPSpec:
    """What ``fit_dp`` needs beyond the ordinary fit: the plan and the accountant history in."""

    plan: DPPlan
    history: tuple[tuple[float, float, int], ...] = ()


def per_sample_grads(
    model: M3TModel,
    params: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    task: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-sample gradients ``{name: [B, *shape]}`` of the task loss w.r.t. ``params`` (the
    trainable tensors by ``named_parameters`` name), and the per-sample losses ``[B]``."""
    spec = model.tasks[task]
    detached = {k: v.detach() for k, v in params.items()}

    def loss_one(p: dict[str, torch.Tensor], inp: dict[str, torch.Tensor], yy: torch.Tensor):
        out = functional_call(model, p, ({m: v.unsqueeze(0) for m, v in inp.items()}, task))
        loss = task_loss(spec, out, yy.unsqueeze(0))
        return loss, loss.detach()

    with warnings.catch_warnings():
        # scaled_dot_product_attention has no batching rule on CPU yet: torch falls back to a
        # loop over samples, which is correct (only slower) — the warning says just that
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        grads, losses = vmap(
            grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different"
        )(detached, dict(inputs), y)
    return grads, losses


def noise_generator(device: torch.device | None, root: int, *keys: object) -> torch.Generator:
    """The DP noise generator, keyed like ``derive_seed``, on the device the gradients live on:
    Opacus draws the noise with ``torch.normal(..., device=grad.device, generator=g)``, which
    refuses a CPU generator for CUDA tensors. On the CPU (``device`` None or cpu) it is
    ``seeding.torch_gen``'s generator, draw for draw; a GPU's generator draws other numbers
    from the same seed, so DP-SGD on a GPU is keyed by the same values but not equal to the
    CPU's.

    >>> a = noise_generator(None, 0, "k")
    >>> b = noise_generator(torch.device("cpu"), 0, "k")
    >>> torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    True
    """
    g = torch.Generator(device=device if device is not None else "cpu")
    g.manual_seed(derive_seed(root, *keys))
    return g


def fit_dp(
    trainer: ClientTrainer,
    *,
    data: ClientData,
    tasks: Sequence[str],
    start: Mapping[str, Mapping[str, torch.Tensor]],
    trainable: Sequence[str],
    key: tuple,
    dp: DPSpec,
) -> tuple[FitResult, tuple[tuple[float, float, int], ...]]:
    """Train ``trainable`` with DP-SGD for one participation; returns the fit and the
    accountant history after it (``dp.history`` plus one entry per step taken)."""
    model = trainer.model
    cfg = trainer.cfg
    plan = dp.plan
    model.load_components(start)
    params = model.set_trainable(trainable)
    model.train()
    ids = {id(p) for p in params}
    named = {n: p for n, p in model.named_parameters() if id(p) in ids}
    if cfg.optimizer == "adam":
        base: torch.optim.Optimizer = torch.optim.Adam(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        base = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    n = len(data)
    q = plan.sample_rate
    from opacus.optimizers import DPOptimizer  # imported when DP-SGD runs: keeps start-up light

    opt = DPOptimizer(
        base,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.clip_norm,
        expected_batch_size=max(1, int(round(q * n))),
        loss_reduction="mean",
        generator=noise_generator(trainer.device, trainer.seed, *key, "dp-noise"),
    )
    prox = [p.detach().clone() for p in params] if cfg.fedprox_mu > 0 else None
    accountant = accountant_of(dp.history)
    per_task = plan.steps_per_round // max(1, cfg.local_epochs * len(tasks))
    schedule = [(e, t, j) for e in range(cfg.local_epochs) for t in tasks for j in range(per_task)]
    order = np_rng(trainer.seed, *key, "dp-order").permutation(len(schedule))
    loss_sum, count, steps = 0.0, 0, 0
    for si in order:
        e, t, j = schedule[si]
        rng = np_rng(trainer.seed, *key, "dp-poisson", e, t, j)
        idx = np.flatnonzero(rng.random(n) < q)
        spec = model.tasks[t]
        opt.zero_grad(set_to_none=True)
        if len(idx):
            inputs, y = _batch(data, idx, spec.modalities, t, trainer.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(trainer.seed, *key, "dp-dropout", e, t, j))
                grads, losses = per_sample_grads(model, named, inputs, y, t)
            for name, p in named.items():
                p.grad_sample = grads[name].to(p.dtype)  # type: ignore[attr-defined]  # Opacus reads it
            loss_sum += float(losses.sum())
            count += len(idx)
        else:  # an empty Poisson batch: the step is pure noise, as the accountant assumes
            for p in named.values():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        if prox is None:
            opt.step()
        elif opt.pre_step():  # clipped, summed and noised: p.grad is the private gradient
            # FedProx's pull towards the round's start depends on the parameters only, never on
            # the data, so adding it after the noise costs no privacy (post-processing)
            for p, p0 in zip(params, prox):
                if p.grad is not None:
                    p.grad.add_(p.detach() - p0, alpha=cfg.fedprox_mu)
            opt.original_optimizer.step()
        accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=q)
        steps += 1
    opt.zero_grad(set_to_none=True)
    for p in named.values():  # leave no Opacus attributes on the shared skeleton
        for attr in ("grad_sample", "summed_grad"):
            if hasattr(p, attr):
                delattr(p, attr)
    model.eval()
    # the state leaves the worker on the CPU whatever device trained it, as ClientTrainer.fit's
    fit = FitResult(to_cpu(model.component_state(trainable)), loss_sum / max(count, 1), steps)
    history = tuple((float(s), float(qq), int(k)) for s, qq, k in accountant.history)
    return fit, history


def train_client(
    trainer: ClientTrainer,
    *,
    plan: DPPlan | None,
    prior: PrivacyState | None,
    data: ClientData,
    tasks: Sequence[str],
    start: Mapping[str, Mapping[str, torch.Tensor]],
    trainable: Sequence[str],
    key: tuple,
) -> tuple[FitResult | None, PrivacyState | None]:
    """Train one client: ordinary fit without a DP plan; DP-SGD with one, unless the next
    participation would overspend the budget — then no fit (None) and a ``budget_spent`` state.

    ``prior`` is the client's accountant state from earlier rounds (None before its first)."""
    if plan is None:
        return trainer.fit(data=data, tasks=tasks, start=start, trainable=trainable, key=key), None
    state = prior or PrivacyState.empty(plan.policy, plan.delta, plan.epsilon)
    projected = epsilon_of(
        merge_history(
            (*state.history, (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round))
        ),
        plan.delta,
    )
    if projected > plan.epsilon * (1 + 1e-9):
        return None, state.spent()
    fit, history = fit_dp(
        trainer,
        data=data,
        tasks=tasks,
        start=start,
        trainable=trainable,
        key=key,
        dp=DPSpec(plan, state.history),
    )
    new = replace(
        state, history=merge_history(history), participations=state.participations + 1, status="ok"
    )
    return fit, replace(new, epsilon=epsilon_of(new.history, plan.delta))
