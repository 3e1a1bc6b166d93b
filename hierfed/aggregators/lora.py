"""LoRA adapter aggregation: the naive per-factor mean and the exact product-space merge.

A LoRA layer adds ``s * B @ A`` to a frozen weight (``A``: r x in, ``B``: out x r,
``s = alpha / r``). Averaging the factors does not average the layers' updates::

    mean_i(B_i) @ mean_i(A_i)  !=  mean_i(B_i @ A_i)

* ``lora_naive`` — the per-factor weighted mean (what most frameworks do by default).
  It is *inexact*: the merged adapter is not the average of the clients' adapters, and the
  error grows with how far the clients' factors drift apart. Associative.
* ``lora_exact`` — averages the products ``dW_i = B_i @ A_i`` (weighted by each client's
  component weight) and re-factors the mean to the layer's rank by truncated SVD. It is
  exact up to the rank: the merged ``B @ A`` equals ``mean_i(B_i @ A_i)`` whenever that
  mean has rank <= r, and is otherwise its best rank-r approximation (Eckart–Young). The
  mean is never formed as a dense matrix: the factors are stacked (FLoRA-style,
  ``[w_1 B_1 .. w_n B_n] @ [A_1; ..; A_n]``) and the SVD is taken of the small core left
  after QR of both stacks. Not associative (a tier's truncation happens before its parent
  sees it), but a hierarchical exact merge equals the flat one whenever no tier truncates.

Factor split. Any invertible ``R`` gives the same product (``B R^-1``, ``R A``), so the
merge must pick a split; ``lora_exact`` returns ``B = U_r S_r`` and ``A = V_r^T``: the
singular values go into ``B`` and ``A`` keeps orthonormal rows. That mirrors LoRA's own
initialisation (``B`` carries the update, ``A`` a well-conditioned input basis), keeps
every rank slot trainable (no ``B = A = 0`` saddle), and orders the slots by singular
value, so keeping the leading ``k`` slots is the best rank-``k`` adapter. It is not the
clients' split, so per-factor state carried across rounds (a server optimizer's moments)
sees a re-parametrised adapter: use the plain ``sgd`` server step (``server_lr: 1``) with
``lora_exact``.

What the aggregator computes from Updates. Updates carry pre-weighted *deltas*
(``tensors[c] = w * (x_c - start_c)``), while products need the clients' absolute
factors. Every child of a node starts a node-round from the node's current state, which
the worker passes as ``AggContext.state``; a child's absolute factors are
``ctx.state[c] + tensors[c] / weights[c]``. The returned Update is again a pre-weighted
delta against ``ctx.state``, so the node's server step lands exactly on the merged factors.

Heterogeneous ranks. The model skeleton holds adapters of the largest rank ``r_max``; a
client of rank ``r < r_max`` (``model.resource_ranks``) starts from the parent's adapter
re-factored to rank ``r`` (``truncate_rank``: best rank-``r`` approximation, zero in the
slots ``>= r``) and trains only those slots (``mask_rank``). Its factors are therefore
zero-padded to ``r_max``: ``lora_naive`` averages the zero-padded factors (HetLoRA-style,
inexact), ``lora_exact`` averages the products of all ranks and re-factors to ``r_max``,
and every client takes its own rank's truncation on the way down (FlexLoRA-style).

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> base = {"adapter.x": {"l.lora_A.weight": torch.zeros(1, 2), "l.lora_B.weight": torch.zeros(2, 1)}}
    >>> ups = [Update.from_delta({"adapter.x": {"l.lora_A.weight": a, "l.lora_B.weight": b}}, 1.0,
    ...                          sender=s, round=0)
    ...        for s, a, b in [("c1", torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]])),
    ...                        ("c2", torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0], [0.0]]))]]
    >>> ctx = AggContext("global", "global", 0, 0, state=base)
    >>> m = LoraExact({}).aggregate(ups, None, ctx)[0].mean()["adapter.x"]
    >>> (m["l.lora_B.weight"] @ m["l.lora_A.weight"]).round(decimals=4).tolist()
    [[0.5, 1.5], [0.0, 0.0]]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.errors import ConfigError, HierfedError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update

_A, _B = ".lora_A.", ".lora_B."


def lora_pairs(params: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """The ``(A key, B key)`` of every LoRA layer among a component's parameters, sorted.

    peft names them ``<module path>.lora_A.weight`` / ``<module path>.lora_B.weight``.
    """
    out = []
    for k in sorted(params):
        if _A in k:
            kb = k.replace(_A, _B)
            if kb in params:
                out.append((k, kb))
    return out


def lowrank_svd(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefs: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``sum_i coefs[i] * bs[i] @ as_[i]`` without forming it.

    Stacks the factors (``out x R`` and ``R x in``, ``R = sum r_i``), takes QR of both
    stacks and the SVD of the ``R x R`` core. Computed in float64; ``Vh`` has
    ``min(in, R)`` orthonormal rows (full within the stacks' row space).
    """
    bcat = torch.cat([c * b.double() for b, c in zip(bs, coefs)], dim=1)  # out x R
    acat = torch.cat([a.double() for a in as_], dim=0)  # R x in
    qb, rb = torch.linalg.qr(bcat)  # out x k, k x R
    qa, ra = torch.linalg.qr(acat.T)  # in x k', k' x R
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=True)  # k x k, k' x k'
    u = qb @ uc
    vh = vch @ qa.T
    return u, s, vh


def refactor(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, *, keep: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B, A)`` of rank ``rank`` from a thin SVD: ``B = U_k S_k``, ``A = V_k^T``.

    ``keep`` (default ``rank``) singular triplets are kept; slots ``keep..rank-1`` get
    ``B = 0`` and, if ``keep == rank`` was asked but the SVD has fewer rows, ``A`` rows
    completed to an orthonormal set (still trainable). With ``keep < rank`` the extra ``A``
    rows are zero too (a client of lower rank: those slots do not exist for it).
    """
    keep = rank if keep is None else keep
    out_dim, in_dim = u.shape[0], vh.shape[1]
    k = min(keep, s.shape[0], vh.shape[0], u.shape[1])
    b = torch.zeros(out_dim, rank, dtype=torch.float64)
    a = torch.zeros(rank, in_dim, dtype=torch.float64)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    if keep == rank and k < rank:
        rows = min(rank, in_dim)
        eye = torch.eye(in_dim, dtype=torch.float64)[:, :rows]
        q, _ = torch.linalg.qr(torch.cat([vh[:k].T, eye], dim=1))
        a[k:rows] = q[:, k:rows].T
    return b, a


def truncate_rank(params: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A component's parameters with every LoRA layer replaced by its best rank-``rank``
    approximation, zero-padded to the stored rank (slots ``>= rank`` are 0 in A and B).

    Used on the way down to a client of lower rank; other parameters are returned as they
    are; ``params`` is not mutated. ``rank`` at or above a layer's stored rank: unchanged.
    """
    out = dict(params)
    for ka, kb in lora_pairs(params):
        a, b = params[ka], params[kb]
        if rank >= a.shape[0]:
            continue
        u, s, vh = lowrank_svd([b], [a], [1.0])
        nb, na = refactor(u, s, vh, a.shape[0], keep=rank)
        out[ka], out[kb] = na.to(a.dtype), nb.to(b.dtype)
    return out


def mask_rank(params: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Zero the rank slots ``>= rank`` of every LoRA layer (rows of A, columns of B).

    A client of rank ``rank`` never uses those slots; with ordinary optimizers their
    gradients are exactly 0 anyway, this removes what noise (DP) may have put there.
    """
    out = dict(params)
    for ka, kb in lora_pairs(params):
        if rank < params[ka].shape[0]:
            a, b = params[ka].clone(), params[kb].clone()
            a[rank:] = 0
            b[:, rank:] = 0
            out[ka], out[kb] = a, b
    return out


@AGGREGATORS.register("lora_naive")
class LoraNaive(Aggregator):
    """Per-factor weighted mean of LoRA ``A`` and ``B`` (and of everything else).

    Inexact for adapters: ``mean(B) @ mean(A) != mean(B @ A)``. With heterogeneous ranks it
    averages the zero-padded factors. Identical arithmetic to ``weighted_mean``; registered
    under its own name so that a run says which adapter rule it used. Associative.
    """

    associative = True

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        return Update.sum(updates), state


@AGGREGATORS.register("lora_exact")
class LoraExact(Aggregator):
    """Weighted mean of the LoRA products ``B_i @ A_i``, re-factored to the layer's rank.

    Components matching ``options.components`` (glob, default ``adapter.*``) get the
    product-space merge layer by layer; their non-LoRA parameters and all other components
    get the weighted mean. Needs ``ctx.state`` (the node's current state). Not associative.
    """

    associative = False
    option_defaults = {"components": "adapter.*"}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        super().check_options(options, key)
        pat = options.get("components", "adapter.*")
        if not isinstance(pat, str) or not pat:
            raise ConfigError(
                f"{key}.components", pat, "give a glob over component names, e.g. 'adapter.*'"
            )

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        total = Update.sum(updates)
        if total is None:
            return None, state
        tensors = {c: dict(p) for c, p in total.tensors.items()}
        ordered = sorted(updates, key=lambda u: u.meta.senders)
        for c in sorted(tensors):
            if not fnmatch.fnmatchcase(c, self.options["components"]) or not lora_pairs(tensors[c]):
                continue
            if ctx.state is None or c not in ctx.state:
                raise HierfedError(
                    f"lora_exact at '{ctx.node_id}' needs the node's current value of '{c}' "
                    "(AggContext.state) to rebuild the clients' factors from their deltas"
                )
            base = ctx.state[c]
            holders = [u for u in ordered if c in u.tensors and u.weights[c] > 0]
            wsum = sum(u.weights[c] for u in holders)
            if wsum <= 0:
                continue
            for ka, kb in lora_pairs(tensors[c]):
                a0, b0 = base[ka].double(), base[kb].double()
                bs = [b0 + u.tensors[c][kb].double() / u.weights[c] for u in holders]
                as_ = [a0 + u.tensors[c][ka].double() / u.weights[c] for u in holders]
                coefs = [u.weights[c] / wsum for u in holders]
                u_, s_, vh_ = lowrank_svd(bs, as_, coefs)
                nb, na = refactor(u_, s_, vh_, a0.shape[0])
                tensors[c][ka] = ((na - a0) * wsum).to(base[ka].dtype)
                tensors[c][kb] = ((nb - b0) * wsum).to(base[kb].dtype)
        return Update(tensors, dict(total.weights), total.meta), state
