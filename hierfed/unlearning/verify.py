"""Evidence of unlearning: a membership-inference AUC, parameter distances and a certificate.

Membership inference (loss-based, after Yeom et al. 2018): the attacker scores each row by the
model's loss on it, lower loss meaning "was trained on". The AUC of that score separating the
forgotten clients' training rows (members) from held-out rows of the same clients (their
test rows: same people, same distribution, never trained on) is 0.5 for a model that never
saw the members and grows with memorisation. It is computed for the global model (the root's
state, ``final_state.safetensors``), the model every client receives.

Example::

    >>> auc_lower_is_member([0.1, 0.3], [0.2, 0.4])
    0.75
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hierfed.config import RunConfig
from hierfed.data.federation import ClientData, Federation
from hierfed.update import State

__all__ = [
    "auc",
    "auc_lower_is_member",
    "file_sha256",
    "l2_per_component",
    "membership_auc",
    "row_losses",
]


def auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """P(a member scores above a non-member), ties counting one half (Mann-Whitney U / mn).
    NaN when either side is empty."""
    m, n = len(member_scores), len(non_member_scores)
    if m == 0 or n == 0:
        return math.nan
    scores = np.concatenate(
        [np.asarray(member_scores, float), np.asarray(non_member_scores, float)]
    )
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1  # the rank of each distinct value's first copy
    ranks = (first + (counts - 1) / 2.0)[inverse]  # ties share their mean rank
    u = float(ranks[:m].sum()) - m * (m + 1) / 2.0
    return u / (m * n)


def auc_lower_is_member(
    member_losses: Sequence[float], non_member_losses: Sequence[float]
) -> float:
    """The loss attack's AUC: a lower loss is scored as more likely a member."""
    return auc([-x for x in member_losses], [-x for x in non_member_losses])


@torch.no_grad()
def row_losses(
    model: Any, state: State, data: ClientData, tasks: Iterable[str], batch_size: int = 256
) -> np.ndarray:
    """Each row's loss under ``state``, averaged over ``tasks`` (cross-entropy for
    classification, squared error for regression). ``model`` is a worker's M3T skeleton."""
    model.load_components(state)
    model.eval()
    n = len(data)
    tasks = list(tasks)
    total = np.zeros(n)
    for t in tasks:
        spec = model.tasks[t]
        for i in range(0, n, batch_size):
            idx = np.arange(i, min(n, i + batch_size))
            inputs = {
                m: torch.from_numpy(np.ascontiguousarray(data.inputs[m][idx]))
                for m in spec.modalities
            }
            y = torch.from_numpy(np.ascontiguousarray(data.labels[t][idx]))
            out = model(inputs, t)
            if spec.kind == "classification":
                loss = torch.nn.functional.cross_entropy(out, y.long(), reduction="none")
            else:
                diff = out.reshape(len(idx), -1) - y.float().reshape(len(idx), -1)
                loss = (diff**2).mean(dim=1)
            total[idx] += loss.double().numpy()
    return total / max(len(tasks), 1)


def membership_auc(
    cfg: RunConfig, federation: Federation, states: Mapping[str, State], clients: Iterable[str]
) -> dict[str, Any]:
    """The loss attack's AUC on ``clients``' training rows vs their test rows, per named state.

    Builds one model skeleton in this process (as a worker does); ``states`` are full model
    states (e.g. two runs' ``final_state``). Clients without test rows add members only."""
    from hierfed.runtime.worker import WorkerCore, WorkerSetup

    core = WorkerCore(WorkerSetup(cfg, federation))
    fed = core.fed  # tokenized as the workers see it
    out: dict[str, Any] = {}
    members = sum(len(fed.train[c]) for c in clients)
    non_members = sum(len(fed.test[c]) for c in clients if c in fed.test)
    for name, state in states.items():
        inn: list[np.ndarray] = []
        held: list[np.ndarray] = []
        for c in sorted(clients):
            tasks = fed.by_id[c].tasks
            inn.append(row_losses(core.model, state, fed.train[c], tasks))
            if c in fed.test and len(fed.test[c]):
                held.append(row_losses(core.model, state, fed.test[c], tasks))
        m_loss = np.concatenate(inn) if inn else np.zeros(0)
        h_loss = np.concatenate(held) if held else np.zeros(0)
        out[name] = {
            "auc": auc_lower_is_member(m_loss.tolist(), h_loss.tolist()),
            "member_loss_mean": float(m_loss.mean()) if len(m_loss) else math.nan,
            "non_member_loss_mean": float(h_loss.mean()) if len(h_loss) else math.nan,
        }
    out["rows"] = {"members": members, "non_members": non_members}
    return out


def l2_per_component(a: State, b: State) -> dict[str, float]:
    """``||a[c] - b[c]||_2`` over each component's parameters (float64), for the components
    both states hold."""
    out = {}
    for c in sorted(set(a) & set(b)):
        sq = sum(float(((a[c][k].double() - b[c][k].double()) ** 2).sum()) for k in sorted(a[c]))
        out[c] = math.sqrt(sq)
    return out


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
