"""What a prediction rests on: per-modality attributions and component ablation.

**Modality attribution** (Captum's ``LayerIntegratedGradients`` over the task's modality
encoders at once): the output explained — the predicted class's logit, or the regression
value — is integrated along the straight path from every encoder's output on a *baseline*
input (zeros: blank features, a blank image, an all-padding text) to its output on the row.
Row ``i``'s attribution to modality ``m`` is the sum over ``m``'s tokens; the sum over
modalities equals ``F(x) - F(encoders at baseline)`` up to the integral's error, which
Captum returns (``delta``). Reported per task: the signed mean, and the mean share
``|a_m| / sum_m' |a_m'|`` of each modality, over rows and per unit.

**Component ablation**: put one trainable component back to its untrained value (as the
seed built it) and measure the metric drop, per task that uses the component, overall and
per unit. A drop near zero: the trained model does not need what that component learned.

Example (a model, as loaded, on a client's rows)::

    attrs = modality_attribution(model, data, "essay_grade")   # {"text": [...], "tabular": [...]}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from hierfed.data.federation import ClientData
from hierfed.explain.scoring import batch_inputs, row_scores
from hierfed.model.m3t import M3TModel
from hierfed.update import State


def modality_attribution(
    model: M3TModel,
    data: ClientData,
    task: str,
    *,
    n_steps: int = 32,
    batch_size: int = 64,
    tol: float = 0.02,
    max_steps: int = 1024,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per modality of ``task``, one attribution per row of ``data``; and the completeness
    error per row (attributions' sum minus the output change they explain). Rows whose error
    exceeds ``tol * max(1, |output change|)`` are integrated again with 4x the steps, up to
    ``max_steps``. ``model`` must already hold the state to explain."""
    from captum.attr import LayerIntegratedGradients

    spec = model.tasks[task]
    mods = tuple(spec.modalities)
    model.eval()

    def forward(*xs: torch.Tensor) -> torch.Tensor:
        return model(dict(zip(mods, xs)), task)

    layers = [model.encoders[m] for m in mods]
    with warnings.catch_warnings():  # the encoders are siblings: none feeds another
        warnings.simplefilter("ignore", UserWarning)
        lig = LayerIntegratedGradients(forward, layers if len(layers) > 1 else layers[0])
    out: dict[str, list[np.ndarray]] = {m: [] for m in mods}
    deltas: list[np.ndarray] = []
    n = len(data)

    def integrate(
        xs: tuple[torch.Tensor, ...], target: torch.Tensor | None, gap: torch.Tensor, steps: int
    ) -> tuple[list[np.ndarray], np.ndarray]:
        base = tuple(torch.zeros_like(x) for x in xs)
        attrs = lig.attribute(
            xs if len(xs) > 1 else xs[0],
            baselines=base if len(base) > 1 else base[0],
            target=target,
            n_steps=steps,
        )
        if len(mods) == 1:
            attrs = [attrs]
        per = [a.detach().reshape(a.shape[0], -1).sum(1).double().numpy() for a in attrs]
        return per, sum(per) - gap.double().numpy()

    for i in range(0, n, batch_size):
        sl = slice(i, min(n, i + batch_size))
        inputs = batch_inputs(data, sl, mods)
        xs = tuple(inputs[m] for m in mods)
        with torch.no_grad():
            pred = forward(*xs)
        target = pred.argmax(-1) if spec.kind == "classification" else None
        # completeness: attributions sum to F(x) - F(x with every encoder at its baseline
        # output); Captum's own delta would run the model on the baseline *inputs*, whose
        # all-padding text also changes the attention mask, so it is computed here
        base = tuple(torch.zeros_like(x) for x in xs)
        gap = _explained(pred, target) - _explained(_at_baseline(model, task, xs, base), target)
        per, delta = integrate(xs, target, gap, n_steps)
        steps = n_steps
        # rows whose quadrature has not converged (a sharp stretch of the path, e.g. through
        # a layer norm) are integrated again with 4x the steps, up to max_steps
        while steps < max_steps:
            bad = np.flatnonzero(np.abs(delta) > tol * np.maximum(1.0, np.abs(gap.numpy())))
            if not len(bad):
                break
            steps = min(max_steps, steps * 4)
            idx = torch.from_numpy(bad)
            sub_t = None if target is None else target[idx]
            per_b, delta_b = integrate(tuple(x[idx] for x in xs), sub_t, gap[idx], steps)
            for k in range(len(mods)):
                per[k][bad] = per_b[k]
            delta[bad] = delta_b
        for m, a in zip(mods, per):
            out[m].append(a)
        deltas.append(delta)
    return {m: np.concatenate(v) for m, v in out.items()}, np.concatenate(deltas)


def _explained(out: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return out if target is None else out.gather(1, target.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def _at_baseline(
    model: M3TModel, task: str, xs: tuple[torch.Tensor, ...], base: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The model's output on ``xs`` with each modality encoder's output replaced by its
    output on the baseline input (forward hooks; the text mask still comes from ``xs``)."""
    mods = tuple(model.tasks[task].modalities)
    handles = []
    for m, b in zip(mods, base):
        enc = model.encoders[m]
        args = (b, model.backbone) if _is_text(model, m) else (b,)
        fixed = enc(*args)
        handles.append(enc.register_forward_hook(lambda _mod, _in, _out, v=fixed: v))
    try:
        return model(dict(zip(mods, xs)), task)
    finally:
        for h in handles:
            h.remove()


def _is_text(model: M3TModel, modality: str) -> bool:
    return model.modalities[modality].kind == "text"


def summarize_attribution(attrs: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Signed mean and mean absolute share of each modality over the rows."""
    mods = sorted(attrs)
    mat = np.stack([attrs[m] for m in mods]) if mods else np.zeros((0, 0))
    absum = np.abs(mat).sum(0)
    safe = np.where(absum > 0, absum, 1.0)
    share = np.abs(mat) / safe
    return {
        m: {"mean": float(mat[k].mean()), "share": float(share[k].mean())}
        for k, m in enumerate(mods)
    }


def uses(model: M3TModel, component: str, task: str) -> bool:
    """Whether ``task``'s forward pass reads ``component``."""
    kind, _, name = component.partition(".")
    if kind == "encoder":
        return name in model.tasks[task].modalities
    if kind in ("head", "prompt"):
        return name == task
    return True  # adapters sit in the shared backbone


def component_ablation(
    model: M3TModel,
    final: State,
    initial: State,
    rows: Mapping[str, ClientData],
    tasks_of: Mapping[str, Sequence[str]],
    *,
    components: Sequence[str] | None = None,
    batch_size: int = 256,
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Per component: per client (of ``rows``), per task it serves and that uses the
    component, the per-row score drop ``final - ablated`` (the model is left at ``final``)."""
    comps = sorted(final) if components is None else list(components)
    model.load_components(final)
    base = {
        cid: {t: row_scores(model, d, t, batch_size=batch_size) for t in tasks_of[cid]}
        for cid, d in rows.items()
    }
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    try:
        for c in comps:
            model.load_components({c: initial[c]})
            per: dict[str, dict[str, np.ndarray]] = {}
            for cid, d in rows.items():
                ts = [t for t in tasks_of[cid] if uses(model, c, t)]
                if ts:
                    per[cid] = {
                        t: base[cid][t] - row_scores(model, d, t, batch_size=batch_size) for t in ts
                    }
            model.load_components({c: final[c]})
            out[c] = per
    finally:
        model.load_components(final)
    return out


def pooled(
    per_client: Mapping[str, Mapping[str, np.ndarray]], unit: Any
) -> dict[str, dict[str, float]]:
    """task -> {"all": mean, <unit>: mean} from per-client per-row values; ``unit(cid)``."""
    acc: dict[str, dict[str, list[np.ndarray]]] = {}
    for cid, res in sorted(per_client.items()):
        for t, v in res.items():
            acc.setdefault(t, {}).setdefault("all", []).append(v)
            acc[t].setdefault(unit(cid), []).append(v)
    return {
        t: {k: float(np.concatenate(v).mean()) for k, v in sorted(parts.items())}
        for t, parts in sorted(acc.items())
    }
