"""Per-client optimizer steps on stacked tensors, with the client's own optimizer.

Every trainable tensor of a cohort is stacked on a leading client dimension ``[C, ...]``. A
step runs the very optimizer ``ClientTrainer.fit`` builds (``hierfed.client.make_optimizer``:
``PlainSGD``, torch's ``SGD`` or ``Adam``) on the stacked tensors, or on the rows of the
clients that step (gathered, stepped, scattered back). The optimizers are elementwise, so
each client's row gets the arithmetic it gets alone.

Optimizer state (momentum buffers, Adam's moments) is kept stacked per tensor; the step count
is kept per (tensor, client), because a client steps a tensor only when its batch produced a
gradient for it (a task head steps on that task's batches only). Rows with different counts
step in separate calls, so Adam's bias correction is each client's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from hierfed.client import make_optimizer
from hierfed.config import TrainConfig


class StackedOptimizer:
    """``make_optimizer(cfg, ...)`` applied row by row (client by client) to stacked tensors."""

    def __init__(self, cfg: TrainConfig, params: Mapping[str, torch.Tensor], clients: int) -> None:
        self.cfg = cfg
        self.params = dict(params)  # name -> [C, ...], updated in place
        self.clients = clients
        self.state: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.params}
        self.count = {n: np.zeros(clients, dtype=np.int64) for n in self.params}

    @torch.no_grad()
    def step(self, rows: np.ndarray, grads: Mapping[str, torch.Tensor]) -> None:
        """One step of the clients ``rows`` (indices into the cohort, ascending) for the tensors
        in ``grads`` (``name -> [len(rows), ...]``); the other tensors and clients are untouched."""
        names = [n for n in self.params if n in grads]  # the optimizer's parameter order
        if not names:
            return
        if (
            len(names) == 1
            or all(  # one count per row, shared by every stepped tensor
                np.array_equal(self.count[n][rows], self.count[names[0]][rows]) for n in names[1:]
            )
        ):
            keys = self.count[names[0]][rows]
        else:
            ids: dict[tuple[int, ...], int] = {}
            keys = np.array(
                [
                    ids.setdefault(tuple(int(self.count[n][r]) for n in names), len(ids))
                    for r in rows
                ]
            )
        for k in np.unique(keys):
            sel = np.flatnonzero(keys == k)
            self._step_rows(rows[sel], sel, names, grads)

    def _step_rows(
        self,
        rows: np.ndarray,
        sel: np.ndarray,
        names: Sequence[str],
        grads: Mapping[str, torch.Tensor],
    ) -> None:
        full = len(rows) == self.clients
        dev = self.params[names[0]].device
        ix = None if full else torch.as_tensor(rows, device=dev)
        gsel = (
            None
            if len(sel) == len(next(iter(grads.values())))
            else torch.as_tensor(sel, device=dev)
        )
        tensors = [
            self.params[n] if ix is None else self.params[n].index_select(0, ix) for n in names
        ]
        opt = make_optimizer(self.cfg, tensors)  # type: ignore[arg-type]  # plain tensors do
        for n, t in zip(names, tensors):
            g = grads[n]
            t.grad = g if gsel is None else g.index_select(0, gsel)
        if isinstance(opt, torch.optim.Optimizer):
            for n, t in zip(names, tensors):
                c = int(self.count[n][rows[0]])
                if c == 0:
                    continue  # the optimizer initializes its state, as for a fresh client
                st: dict[str, torch.Tensor] = {
                    k: (v if ix is None else v.index_select(0, ix))
                    for k, v in self.state[n].items()
                }
                if isinstance(opt, torch.optim.Adam):
                    st["step"] = torch.tensor(float(c), dtype=_get_scalar_dtype())
                opt.state[t] = st
        opt.step()
        for n, t in zip(names, tensors):
            t.grad = None
            self.count[n][rows] += 1
            if ix is not None:
                self.params[n].index_copy_(0, ix, t)
            if not isinstance(opt, torch.optim.Optimizer):
                continue
            for k, v in opt.state[t].items():
                if k == "step" or not isinstance(v, torch.Tensor):
                    continue
                if ix is None:
                    self.state[n][k] = v
                else:
                    full_v = self.state[n].get(k)
                    if full_v is None:
                        full_v = self.state[n][k] = v.new_zeros((self.clients, *v.shape[1:]))
                    full_v.index_copy_(0, ix, v)
