"""Compression codecs. The receiver sees decoded values; the ledger counts encoded bytes.

Every codec encodes the sender's mean delta tensor by tensor and sends one fp32 weight per
component (``hierfed.postprocess.wire.Codec``); bytes on the wire per tensor of ``n`` values:

* ``fp16``: ``2 n``.
* ``int8``: ``n + 4`` — one fp32 scale ``s = max|x| / 127`` and ``q = floor(x / s + u)`` with
  ``u ~ U[0, 1)`` drawn from a generator keyed by ``(seed, round, sender, component,
  parameter)``: unbiased stochastic rounding, ``E[q s] = x``, every run alike.
* ``topk``: ``k (4 + i)`` with ``k = ceil(ratio n)``: the ``k`` largest-magnitude values
  (fp32) and their indices (``i = 2`` bytes when ``n <= 65536``, else 4). Error feedback: the
  sender adds what it left out last time (its residual) before choosing, and keeps what it
  leaves out now; the residual is the sender's persistent state (``ClientStore.codec``,
  checkpointed, so ``--resume`` continues bit-identically). Over rounds the receiver gets the
  whole delta: ``sum(delivered) = sum(deltas) - final residual``.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> from hierfed.postprocess.base import PostContext, apply_chain
    >>> u = Update.from_delta({"head.t": {"w": torch.tensor([0.5, -1.0, 0.25, 0.0])}}, 2.0,
    ...                       sender="s", round=1)
    >>> out, sizes = apply_chain([Int8({})], u, PostContext("s", "p", "global", 1, 0))
    >>> sizes  # 4 values + a scale + the weight
    {'head.t': 12}
    >>> delivered, residual = TopK({"ratio": 0.5}).deliver(u, PostContext("s", "p", "global", 1, 0), None)
    >>> delivered.mean()["head.t"]["w"].tolist(), residual["head.t"]["w"].tolist()
    ([0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.25, 0.0])
"""

from __future__ import annotations

import math

import torch

from hierfed.errors import ConfigError
from hierfed.postprocess.base import PostContext
from hierfed.postprocess.wire import Codec, wire_masks
from hierfed.registry import POSTPROCESSORS
from hierfed.seeding import torch_gen
from hierfed.update import State, Update

INT8_LEVELS = 127  # q in [-127, 127]: symmetric, so 0 is exact


@POSTPROCESSORS.register("fp16")
class Fp16(Codec):
    """Send the mean delta in half precision (2 bytes per value) plus one fp32 weight."""

    def encode(
        self, x: torch.Tensor, *, ctx: PostContext, component: str, param: str
    ) -> torch.Tensor:
        return x.to(torch.float16).to(x.dtype)

    def tensor_nbytes(self, n: int) -> int:
        return 2 * n


@POSTPROCESSORS.register("int8")
class Int8(Codec):
    """8-bit values with one fp32 scale per tensor; unbiased keyed stochastic rounding."""

    def encode(
        self, x: torch.Tensor, *, ctx: PostContext, component: str, param: str
    ) -> torch.Tensor:
        return int8_round(x, torch_gen(ctx.seed, ctx.round, ctx.sender, component, param, "int8"))

    def tensor_nbytes(self, n: int) -> int:
        return n + 4


def int8_round(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` stochastically rounded to the grid ``s * {-127..127}``, ``s = max|x| / 127``."""
    if x.numel() == 0:
        return x.clone()
    s = x.abs().max() / INT8_LEVELS
    if float(s) == 0.0:
        return torch.zeros_like(x)
    u = torch.rand(x.shape, generator=gen, dtype=x.dtype)
    q = torch.floor(x / s + u).clamp(-INT8_LEVELS, INT8_LEVELS)
    return q * s


def topk_count(n: int, ratio: float) -> int:
    """Values a top-k codec keeps of ``n``: ``ceil(ratio n)``, at least one (none of none)."""
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


@POSTPROCESSORS.register("topk")
class TopK(Codec):
    """The ``ratio`` largest-magnitude values per tensor with error feedback on the sender."""

    option_defaults = {"ratio": 0.1}
    stateful = True

    @classmethod
    def check_options(cls, options, key="options"):
        super().check_options(options, key)
        r = options.get("ratio", 0.1)
        if not isinstance(r, (int, float)) or isinstance(r, bool) or not 0 < r <= 1:
            raise ConfigError(
                f"{key}.ratio", r, "must be a number in (0, 1] (fraction of values sent)"
            )

    def encode(
        self, x: torch.Tensor, *, ctx: PostContext, component: str, param: str
    ) -> torch.Tensor:
        return x  # the selection needs the sender's residual: it happens in ``deliver``

    def process(self, update: Update, ctx: PostContext) -> Update:
        return update

    def tensor_nbytes(self, n: int) -> int:
        k = topk_count(n, float(self.options["ratio"]))
        return k * (4 + (2 if n <= 2**16 else 4))

    def deliver(
        self, update: Update, ctx: PostContext, memory: State | None
    ) -> tuple[Update, State | None]:
        ratio = float(self.options["ratio"])
        residual: State = {c: dict(p) for c, p in (memory or {}).items()}
        tensors = {}
        for c, params in update.tensors.items():
            w = update.weights[c]
            masks = wire_masks(params, ctx.rank)
            kept = residual.setdefault(c, {})
            out = {}
            for p, t in params.items():
                prev = kept.get(p)
                acc = t / w if prev is None else t / w + prev
                on = masks.get(p)
                flat = acc.reshape(-1)
                cand = flat.abs() if on is None else flat.abs().masked_fill(~on.reshape(-1), -1.0)
                n = flat.numel() if on is None else int(on.sum())
                order = torch.argsort(cand, descending=True, stable=True)[: topk_count(n, ratio)]
                sent = torch.zeros_like(flat)
                sent[order] = flat[order]
                left = flat.clone()
                left[order] = 0
                if on is not None:
                    left[~on.reshape(-1)] = 0  # off the wire: delivered exactly, nothing left
                kept[p] = left.reshape(t.shape)
                value = sent.reshape(t.shape) * w
                if on is not None:
                    value = torch.where(on, value, t)
                out[p] = value
            tensors[c] = out
        return Update(tensors, dict(update.weights), update.meta), residual
