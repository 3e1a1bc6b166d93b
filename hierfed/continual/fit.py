"""What a continual client does differently in local training (``ClientTrainer.fit``'s hook).

The engine gives each training job a ``ContinualFit``: the tasks the client has data for this
round, and its *old* tasks (had before, window closed). With mitigations on:

* **replay** (``continual.replay``): each old task is trained on too, but only on the client's
  *memory*: ``continual.memory`` of its rows of that task, a keyed sample fixed per client and
  task (a pure function of the seed, so it is the same in every round and after a resume, and
  it is never sent anywhere);
* **EWC** (``continual.ewc = lambda``): the loss gets ``lambda/2 * sum_i F_i (theta_i -
  theta*_i)^2`` over the shared components the client trains, where ``theta*`` is the global
  state at the start of the round in which the client's last old task closed (the end-of-stage
  global model), and ``F`` the diagonal empirical Fisher of the old tasks' loss at
  ``theta*``, estimated on the client's memory rows (squared mini-batch gradients, summed,
  then scaled so that its largest entry is 1). Recomputed from ``theta*`` and the memory in
  every round it is used, so nothing but the anchor is carried.

Example::

    >>> cf = ContinualFit("global/i/s", tasks=("b",), old=("a",), memory=3, replay=True)
    >>> cf.plan(seed=0, n=10)[0]
    ('b', 'a')
    >>> len(cf.plan(seed=0, n=10)[1]["a"])
    3
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hierfed.seeding import np_rng
from hierfed.update import State

if TYPE_CHECKING:
    from hierfed.client import ClientTrainer
    from hierfed.data.federation import ClientData


@dataclass(frozen=True)
class ContinualFit:
    client_id: str
    tasks: tuple[str, ...]  # tasks with data this round
    old: tuple[str, ...] = ()  # tasks whose window closed (trained only on memory, if replay)
    memory: int = 0  # rows kept per old task
    replay: bool = False
    ewc: float = 0.0
    anchor: State | None = None  # EWC theta* (shared components only)

    def memory_rows(self, seed: int, task: str, n: int) -> np.ndarray:
        """The client's kept rows of old task ``task`` (sorted; the same in every round)."""
        rng = np_rng(seed, "continual-memory", self.client_id, task)
        return np.sort(rng.choice(n, size=min(self.memory, n), replace=False))

    def plan(self, *, seed: int, n: int) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
        """The tasks trained this round and, for replayed ones, the rows they use."""
        if not (self.replay and self.old):
            return self.tasks, {}
        rows = {t: self.memory_rows(seed, t, n) for t in self.old}
        return (*self.tasks, *self.old), rows

    def penalty(
        self, trainer: ClientTrainer, data: ClientData, trainable: Sequence[str], key: tuple
    ) -> Callable[[], torch.Tensor] | None:
        """The EWC term as a closure over the live parameters, or None when EWC is off here.

        Call with the client's start state loaded; leaves it loaded."""
        if self.ewc <= 0 or self.anchor is None or not self.old:
            return None
        model = trainer.model
        comps = [c for c in trainable if c in self.anchor]
        if not comps:
            return None
        live = model._live_tensors()
        params = [(c, k) for c in comps for k in sorted(self.anchor[c])]
        start = model.component_state(comps)
        model.load_components({c: self.anchor[c] for c in comps})
        fisher = _fisher(trainer, data, [live[c][k] for c, k in params], self, key)
        model.load_components(start)
        anchor = [self.anchor[c][k].to(f.device) for (c, k), f in zip(params, fisher)]
        lam = float(self.ewc)

        def term() -> torch.Tensor:
            total = sum(
                (f * (live[c][k] - a) ** 2).sum() for (c, k), f, a in zip(params, fisher, anchor)
            )
            return 0.5 * lam * total  # type: ignore[return-value]

        return term


def _fisher(
    trainer: ClientTrainer,
    data: ClientData,
    params: Sequence[torch.Tensor],
    cf: ContinualFit,
    key: tuple,
) -> list[torch.Tensor]:
    """Mean squared mini-batch gradient of each old task's loss over its memory rows."""
    from hierfed.client import _batch, task_loss

    model = trainer.model
    acc = [torch.zeros_like(p) for p in params]
    batches = 0
    bs = trainer.cfg.batch_size
    for t in cf.old:
        rows = cf.memory_rows(trainer.seed, t, len(data))
        spec = model.tasks[t]
        for i in range(0, len(rows), bs):
            inputs, y = _batch(data, rows[i : i + bs], spec.modalities, t, trainer.device)
            loss = task_loss(spec, model(inputs, t), y)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach() ** 2)
            batches += 1
    # scaled so that the largest entry is 1: lambda is then the pull on the most important
    # weight, comparable across models and data sets
    top = max((float(a.max()) for a in acc if a.numel()), default=0.0)
    return [a / top if top > 0 else a for a in acc]
