"""The overhead workload, shared by all three implementations so their math is identical.

* ``workload_config`` — the hierfed RunConfig (star, FedAvg, the ``mlp`` model on
  ``mlp-bench``); the floor and Flower read the same config, federation and initial model.
* ``local_train`` — one client's local training as a plain PyTorch loop: the same keyed batch
  order, loss, optimizer and step count as ``hierfed.client.ClientTrainer.fit``.
* ``cohort`` — the clients of a round, drawn by ``hierfed.engine.sampling.sample`` as a star's
  root draws them (key ``(seed, "sample", round, 0, "global")``).
* ``accuracy`` — accuracy of a parameter vector on the global held-out rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks.mlp_bench import MLP_OVERRIDES, TASK
from hierfed.config import RunConfig, load_config
from hierfed.data.federation import ClientData, Federation
from hierfed.engine.sampling import sample
from hierfed.model.m3t import M3TModel, build_model
from hierfed.seeding import np_rng
from hierfed.simulation import build_federation


@dataclass(frozen=True)
class Workload:
    clients: int
    participation: float
    rounds: int = 5
    seed: int = 0
    # 0: the plain small MLP (tabular encoder and head trained, frozen fc1, no peft);
    # r > 0: the same MLP with a rank-r peft LoRA adapter on fc1 trained as well
    lora_rank: int = 0

    @property
    def tag(self) -> str:
        lora = f"-lora{self.lora_rank}" if self.lora_rank else ""
        return f"n{self.clients}-p{int(round(self.participation * 100))}{lora}"


def workload_config(
    w: Workload, *, runtime: str = "ray", out: str | None = None, extra: Sequence[str] = ()
) -> RunConfig:
    """N clients = 10 institutions x N/10 students (the star ignores institutions)."""
    inst = 10 if w.clients >= 10 else 1
    ov = {
        **MLP_OVERRIDES,
        "data.num_institutions": inst,
        "data.students_per_institution": w.clients // inst,
        "rounds": w.rounds,
        "seed": w.seed,
        "eval.every": w.rounds,
        "topology.default.participation": w.participation,
        "runtime.name": runtime,
        "model.lora_rank": w.lora_rank,
    }
    return load_config(
        None, [f"{k}={v}" for k, v in ov.items()] + list(extra), topology="star", out=out
    )


def build(cfg: RunConfig) -> tuple[Federation, M3TModel, list[str]]:
    """The federation, the model skeleton and the trainable component names (sorted)."""
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    comps = sorted(model.component_names())
    return fed, model, comps


def trainable_params(model: M3TModel, comps: Sequence[str]) -> list[nn.Parameter]:
    return model.set_trainable(comps)


def cohort(cfg: RunConfig, ids: Sequence[str], rnd: int) -> list[str]:
    """The round's sampled clients, as the star topology samples them."""
    p = cfg.topology.default.participation
    return sample(seed=cfg.seed, node="global", members=ids, p=p, rnd=rnd, key=(0,))


def local_train(
    model: M3TModel,
    params: Sequence[nn.Parameter],
    start: Sequence[torch.Tensor],
    data: ClientData,
    *,
    cfg: RunConfig,
    key: tuple,
) -> tuple[list[torch.Tensor], float]:
    """Copy ``start`` into ``params``, train E epochs of SGD, return the new values and the
    last epoch's mean loss. Batch order: ``np_rng(seed, *key, epoch, "batches")``, like hierfed."""
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    model.train()
    opt = torch.optim.SGD(params, lr=cfg.train.lr)
    x_all = data.inputs["tabular"]
    y_all = data.labels[TASK]
    n, bs = len(y_all), cfg.train.batch_size
    loss_sum = 0.0
    for epoch in range(cfg.train.local_epochs):
        rng = np_rng(cfg.seed, *key, epoch, "batches")
        perm = rng.permutation(n)
        batches = [perm[i : i + bs] for i in range(0, n, bs)]
        order = rng.permutation(len(batches))
        loss_sum = 0.0
        for b in order:
            idx = batches[b]
            x = torch.from_numpy(np.ascontiguousarray(x_all[idx]))
            y = torch.from_numpy(np.ascontiguousarray(y_all[idx]))
            loss = nn.functional.cross_entropy(model({"tabular": x}, TASK), y.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
    model.eval()
    return [p.detach().clone() for p in params], loss_sum / n


@torch.no_grad()
def accuracy(
    model: M3TModel,
    params: Sequence[nn.Parameter],
    values: Sequence[torch.Tensor],
    data: ClientData,
) -> float:
    for p, v in zip(params, values):
        p.copy_(v)
    model.eval()
    x = torch.from_numpy(data.inputs["tabular"])
    y = torch.from_numpy(data.labels[TASK])
    correct = 0
    for i in range(0, len(y), 256):
        correct += int(
            (model({"tabular": x[i : i + 256]}, TASK).argmax(-1) == y[i : i + 256]).sum()
        )
    return correct / len(y)
