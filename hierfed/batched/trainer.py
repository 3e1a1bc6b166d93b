"""CohortTrainer: train many clients in one vectorized pass over the shared frozen skeleton.

``ClientTrainer.fit`` trains one client at a time; for small components most of each step is
framework dispatch. Here every client's tensors (the components in its start state) are
stacked on a leading client dimension and one ``torch.func.vmap`` of the model's
``functional_call`` runs the forward pass of all of them at once; autograd then gives every
client's gradient in one backward pass (each client's loss depends on its own row only, so the
gradient of the summed losses is, row by row, the client's own gradient).

What stays per client, exactly as ``ClientTrainer.fit`` does it:

* its data, its keyed batch order (``ClientTrainer.schedule``, the same keys), its local
  epochs, its number of steps and its loss bookkeeping;
* its optimizer (``hierfed.batched.optim.StackedOptimizer``), FedProx term and clipping.

At each step, the clients still training are split by (task, batch length): a group runs as
one ``vmap`` call, so a short last batch is never padded into anyone's math, and a client
whose schedule ended (fewer rows, fewer steps) simply takes no part. Clients are stacked only
with clients of the same *signature* (trained components, tasks, components in the start
state): ``cohort_groups`` cuts a cohort into such groups.

Equality: on the CPU, every client's trained tensors and loss are bit-identical to
``ClientTrainer.fit``'s for the models and optimizers the tests cover
(``tests/test_batched.py``): the batched kernels compute each row as the one-client kernels
do. Unsupported here (callers fall back to one at a time): dropout that is active in training
(its keyed per-client draws cannot be reproduced under ``vmap``) and DP-SGD.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from hierfed.batched.optim import StackedOptimizer
from hierfed.client import ClientTrainer, FitResult, task_loss, to_cpu
from hierfed.data.federation import ClientData
from hierfed.update import State

# torch's CPU ``bmm`` computes a matrix product whose rows x columns x contraction is below
# this with its own naive loop (aten/src/ATen/native/LinearAlgebra.cpp), not with the BLAS
# kernel that ``mm`` uses, so the sums come out in another order. A batch of a client whose
# stacked ``nn.Linear`` would fall under it is stepped client by client instead.
_BMM_NAIVE_BELOW = 400


class NotBatchable(Exception):
    """This cohort cannot train batched (the caller trains it one client at a time)."""


@dataclass(frozen=True)
class CohortItem:
    """One client's fit, with ``ClientTrainer.fit``'s arguments."""

    data: ClientData
    tasks: tuple[str, ...]
    start: State
    trainable: tuple[str, ...]
    key: tuple

    def signature(self) -> tuple:
        """Clients with equal signatures stack: same trained and loaded tensors, same tasks."""
        loaded = tuple(sorted((c, tuple(p)) for c, p in self.start.items()))
        return (tuple(sorted(set(self.trainable))), self.tasks, loaded)


def cohort_groups(items: Sequence[CohortItem], max_clients: int) -> list[list[int]]:
    """Indices of ``items`` cut into stackable groups of at most ``max_clients``, in order of
    first appearance (so the cut depends only on the items, never on worker counts)."""
    by_sig: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        by_sig.setdefault(it.signature(), []).append(i)
    out: list[list[int]] = []
    for idx in by_sig.values():
        out += [idx[j : j + max_clients] for j in range(0, len(idx), max(1, max_clients))]
    return out


class CohortTrainer:
    """Trains a stackable group of clients at once on a ``ClientTrainer``'s skeleton."""

    def __init__(self, trainer: ClientTrainer) -> None:
        self.trainer = trainer
        self.model = trainer.model
        self.cfg = trainer.cfg
        self.device = trainer.device
        self._names: dict[int, str] | None = None

    def _qualified(self) -> dict[int, str]:
        """id(live tensor) -> its name in ``functional_call``'s namespace (built once)."""
        if self._names is None:
            m = self.model
            self._names = {id(t): n for n, t in (*m.named_parameters(), *m.named_buffers())}
        return self._names

    def fit_group(self, items: Sequence[CohortItem]) -> list[FitResult]:
        """Train ``items`` (one signature) together; one FitResult per item, in order."""
        if len({it.signature() for it in items}) != 1:
            raise NotBatchable("the clients of a group must share one signature")
        model = self.model
        model.train()
        if any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
            raise NotBatchable("dropout is active in training (keyed per-client draws)")
        first = items[0]
        live = model._live_tensors()
        qual = self._qualified()
        layout: list[tuple[str, str, str]] = []  # (component, key, qualified name)
        for c, params in first.start.items():
            if c not in live or live[c].keys() != params.keys():
                raise NotBatchable(f"component {c} has no live tensors to stack")
            layout += [(c, k, qual[id(live[c][k])]) for k in params]
        trained = sorted(set(first.trainable))
        # the parameter order of ClientTrainer.fit (set_trainable): sorted components
        order = [qual[id(p)] for c in trained for p in model.component_parameters(c)]
        dev = self.device if self.device is not None else torch.device("cpu")
        stacked = {
            n: torch.stack([it.start[c][k] for it in items]).to(dev, live[c][k].dtype)
            for c, k, n in layout
        }
        missing = [n for n in order if n not in stacked]
        if missing:
            raise NotBatchable(f"trained tensors missing from the start state: {missing[:2]}")
        frozen = {n: t for n, t in stacked.items() if n not in set(order)}
        cfg = self.cfg
        mu = cfg.fedprox_mu
        prox = {n: stacked[n].clone() for n in order} if mu > 0 else {}
        opt = StackedOptimizer(cfg, {n: stacked[n] for n in order}, len(items))
        min_rows = self._min_rows(stacked)
        plans = [self._plan(it) for it in items]
        steps = np.array([len(p) for p in plans])
        loss_sum = [0.0] * len(items)
        count = [0] * len(items)
        for s in range(int(steps.max(initial=0))):
            groups: dict[tuple[str, int, bool], list[int]] = {}
            for a in np.flatnonzero(steps > s).tolist():
                epoch, t, idx = plans[a][s]
                if epoch != (plans[a][s - 1][0] if s else -1):
                    loss_sum[a], count[a] = 0.0, 0  # a new epoch: the loss is the last epoch's
                groups.setdefault((t, len(idx), self._padded(items[a], t, idx)), []).append(a)
            for (t, _, padded), rows in groups.items():
                last = any(plans[r][s][0] == cfg.local_epochs - 1 for r in rows)
                losses = self._group_step(
                    items,
                    plans,
                    s,
                    t,
                    np.array(rows),
                    stacked,
                    frozen,
                    prox,
                    order,
                    mu,
                    opt,
                    report=last,
                    one_by_one=len(plans[rows[0]][s][2]) < min_rows,
                    padded=padded,
                )
                for r, loss in zip(rows, losses):
                    n_rows = len(plans[r][s][2])
                    loss_sum[r] += loss * n_rows
                    count[r] += n_rows
        out = []
        for i in range(len(items)):
            state = {
                c: {k: stacked[qual[id(live[c][k])]][i].clone() for k in live[c]} for c in trained
            }
            if dev.type != "cpu":
                state = to_cpu(state)
            out.append(FitResult(state, loss_sum[i] / max(count[i], 1), int(steps[i])))
        # leave the skeleton as one-at-a-time training of these clients would: the last one's
        model.load_components({c: items[-1].start[c] for c in items[-1].start})
        model.load_components(out[-1].state)
        return out

    def _padded(self, it: CohortItem, task: str, idx: np.ndarray) -> bool:
        """Whether a transformers backbone would see padding in this batch (clients with and
        without padding run apart: without, the model skips its mask altogether)."""
        model = self.model
        if not hasattr(model.backbone, "vmap_mask"):
            return False
        for j, m in enumerate(model.tasks[task].modalities):  # M3TModel.forward's mask
            if model.modalities[m].kind == "text":
                keep = it.data.inputs[m][idx] != 0
                if j == 0 and not model.prompt_tokens:
                    keep[:, 0] = True  # the model never masks its first token
                if not keep.all():
                    return True
        return False

    def _min_rows(self, stacked: dict[str, torch.Tensor]) -> int:
        """The fewest batch rows at which every stacked ``nn.Linear`` runs on the BLAS path."""
        need = 1
        for n in stacked:
            mod_name, _, leaf = n.rpartition(".")
            mod = self.model.get_submodule(mod_name) if mod_name else self.model
            if leaf == "weight" and isinstance(mod, nn.Linear):
                size = mod.in_features * mod.out_features
                need = max(need, -(-_BMM_NAIVE_BELOW // size))
        return need

    def _plan(self, it: CohortItem) -> list[tuple[int, str, np.ndarray]]:
        """Every step of the client, in order: (epoch, task, row indices)."""
        sched = self.trainer.schedule
        return [
            (e, t, idx)
            for e in range(self.cfg.local_epochs)
            for t, idx in sched(it.data, it.tasks, (*it.key, e))
        ]

    def _group_step(
        self,
        items: Sequence[CohortItem],
        plans: Sequence[Sequence[tuple[int, str, np.ndarray]]],
        s: int,
        task: str,
        rows: np.ndarray,
        stacked: dict[str, torch.Tensor],
        frozen: dict[str, torch.Tensor],
        prox: dict[str, torch.Tensor],
        order: Sequence[str],
        mu: float,
        opt: StackedOptimizer,
        *,
        report: bool,
        one_by_one: bool,
        padded: bool,
    ) -> list[float]:
        """One step of the clients ``rows``, all on ``task`` with equally long batches."""
        model = self.model
        spec = model.tasks[task]
        dev = next(iter(stacked.values())).device
        full = len(rows) == len(items)
        ix = None if full else torch.as_tensor(rows, device=dev)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if ix is None else t.index_select(0, ix)

        inputs = {}
        for m in spec.modalities:
            arr = np.stack([items[i].data.inputs[m][plans[i][s][2]] for i in rows])
            inputs[m] = torch.from_numpy(arr).to(dev)
        y = torch.from_numpy(
            np.stack([items[i].data.labels[task][plans[i][s][2]] for i in rows])
        ).to(dev)
        leaves = {n: pick(stacked[n]).detach().requires_grad_(True) for n in order}
        fixed = {n: pick(t) for n, t in frozen.items()}
        anchor = {n: pick(t) for n, t in prox.items()}

        def one(p, f, p0, inp, yy):  # one client's step, as ClientTrainer.fit computes it
            out = functional_call(model, {**f, **p}, (inp, task))
            total = task_loss(spec, out, yy)
            if mu > 0:
                total = total + 0.5 * mu * sum(((p[n] - p0[n]) ** 2).sum() for n in order)
            return total, out.detach()

        def logits(p, f, p0, inp):  # the batched forward; the loss is taken outside vmap
            out = functional_call(model, {**f, **p}, (inp, task))
            if mu > 0:
                return out, 0.5 * mu * sum(((p[n] - p0[n]) ** 2).sum() for n in order)
            return (out,)

        names = list(leaves)
        bb = model.backbone
        hf = hasattr(bb, "vmap_mask")  # a transformers backbone (hierfed/model/hf_backbone.py)
        if one_by_one:  # batches too small for the batched kernels to match: client by client
            outs_l, per = [], []
            for j in range(len(rows)):
                lj = {n: t[j].detach().requires_grad_(True) for n, t in leaves.items()}
                pick_j = {m: v[j] for m, v in inputs.items()}
                total, out = one(
                    lj,
                    {n: t[j] for n, t in fixed.items()},
                    {n: t[j] for n, t in anchor.items()},
                    pick_j,
                    y[j],
                )
                per.append(torch.autograd.grad(total, [lj[n] for n in names], allow_unused=True))
                outs_l.append(out)
            outs = torch.stack(outs_l)
            grads: Sequence[torch.Tensor | None] = [
                None if per[0][k] is None else torch.stack([g[k] for g in per])  # type: ignore[misc]
                for k in range(len(names))
            ]
        else:
            with warnings.catch_warnings():
                # an op without a batching rule (e.g. attention on the CPU) runs client by client
                warnings.filterwarnings("ignore", message=".*batching rule.*")
                try:
                    if hf:
                        setattr(bb, "vmap_mask", "4d" if padded else "full")  # noqa: B010
                    if spec.kind == "classification":
                        # cross-entropy per row, then each client's mean: the same gradient as
                        # the mean cross-entropy, without vmap's Python decomposition of it
                        res = vmap(logits)(leaves, fixed, anchor, inputs)
                        outs = res[0]
                        nc, nb = y.shape
                        rows_loss = nn.functional.cross_entropy(
                            outs.reshape(nc * nb, -1), y.reshape(-1).long(), reduction="none"
                        )
                        totals = rows_loss.view(nc, nb).mean(1)
                        if mu > 0:
                            totals = totals + res[1]
                        outs = outs.detach()
                    else:
                        totals, outs = vmap(one)(leaves, fixed, anchor, inputs, y)
                finally:
                    if hf:
                        setattr(bb, "vmap_mask", None)  # noqa: B010
            grads = torch.autograd.grad(totals.sum(), [leaves[n] for n in names], allow_unused=True)
        got = {n: g for n, g in zip(names, grads) if g is not None}
        if self.cfg.max_grad_norm > 0 and got:
            self._clip(got, len(rows))
        opt.step(rows, got)
        if not report:
            return [0.0] * len(rows)
        # the reported loss: the batched mean reduction sums in another order than the
        # one-client kernel, so each client's loss is taken by that kernel on its own outputs
        with torch.no_grad():
            return [float(task_loss(spec, outs[j], y[j])) for j in range(len(rows))]

    def _clip(self, grads: dict[str, torch.Tensor], clients: int) -> None:
        """``nn.utils.clip_grad_norm_`` of each client's own gradients (row by row)."""
        max_norm = float(self.cfg.max_grad_norm)
        for r in range(clients):
            mine = [g[r] for g in grads.values()]
            total = nn.utils.get_total_norm(mine, 2.0)
            torch._foreach_mul_(mine, torch.clamp(max_norm / (total + 1e-6), max=1.0))
