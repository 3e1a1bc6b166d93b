"""Per-row scores of a model on a client's rows: the unit every explain metric sums.

Classification: 1.0 where the arg-max is the label, else 0.0 (the mean is accuracy).
Regression: minus the squared error (the mean is ``neg_mse``, as ``ClientTrainer.evaluate``).
Higher is better for both, so "worst" is always the minimum.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from hierfed.data.federation import ClientData
from hierfed.model.m3t import M3TModel


def batch_inputs(
    data: ClientData, idx: slice | np.ndarray, modalities: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    return {m: torch.from_numpy(np.ascontiguousarray(data.inputs[m][idx])) for m in modalities}


def score_rows(pred: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "classification":
        return (pred.argmax(-1) == y.long()).double()
    return -((pred.double() - y.double()) ** 2)


@torch.no_grad()
def row_scores(
    model: M3TModel,
    data: ClientData,
    task: str,
    *,
    state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """One score per row of ``data`` for ``task`` (``state``, if given, is loaded first)."""
    if state is not None:
        model.load_components(state)
    model.eval()
    spec = model.tasks[task]
    n = len(data)
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, min(n, i + batch_size))
        pred = model(batch_inputs(data, sl, spec.modalities), task)
        y = torch.from_numpy(np.ascontiguousarray(data.labels[task][sl]))
        out.append(score_rows(pred, y, spec.kind).numpy())
    return np.concatenate(out) if out else np.zeros(0)
