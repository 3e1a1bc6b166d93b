"""Codecs on the broadcast (parent -> child), chosen per parent tier: ``broadcast_codec``.

``topology.tiers.<parent>.broadcast_codec: fp16 | int8`` (default ``none``) encodes the
*state* the parent sends its sampled members, once per node-round: every member decodes the
same values and trains from them (its delta is taken against what it received, so the parent
applies it to its own exact state). Quantizing the state, not a delta against the member's
last copy, keeps the broadcast stateless: a student sampled once in ten rounds holds no copy
to apply a delta to. Top-k therefore has no broadcast form (a sparse state is not a model).
Bytes per tensor of ``n`` values: ``fp16`` ``2 n``; ``int8`` ``n + 4`` (one fp32 scale, keyed
unbiased stochastic rounding, keys ``(seed, round, node-round key, parent, component,
parameter, "down")``).

Example::

    >>> import torch
    >>> st = {"head.t": {"w": torch.tensor([0.5, -1.0])}}
    >>> encode_state_keyed("fp16", st, seed=0, rnd=1, key=(), sender="global")["head.t"]["w"].tolist()
    [0.5, -1.0]
    >>> state_nbytes_as("int8", st["head.t"])
    6
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hierfed.postprocess.codecs import int8_round
from hierfed.seeding import torch_gen
from hierfed.update import State

BROADCAST_CODECS = ("none", "fp16", "int8")


def encode_state(codec: str, state: State, ctx: Any, sender: str) -> State:
    """``state`` as the receivers of ``sender``'s broadcast decode it (``codec: none``: it
    as it is); ``ctx``: the round's context (its ``round``, ``key`` and the run seed)."""
    if codec == "none":
        return state
    return encode_state_keyed(
        codec, state, seed=ctx.seed, rnd=ctx.round, key=ctx.key, sender=sender
    )


def encode_state_keyed(
    codec: str, state: State, *, seed: int, rnd: int, key: Sequence[object], sender: str
) -> State:
    """``encode_state`` with its keys given one by one."""
    if codec == "none":
        return state
    out: State = {}
    for c, params in state.items():
        enc = {}
        for p, t in params.items():
            if codec == "fp16":
                enc[p] = t.to(torch.float16).to(t.dtype)
            else:
                gen = torch_gen(seed, rnd, tuple(key), sender, c, p, "down")
                enc[p] = int8_round(t.reshape(-1), gen).reshape(t.shape).to(t.dtype)
        out[c] = enc
    return out


def state_nbytes_as(codec: str, params: Mapping[str, torch.Tensor]) -> int:
    """Bytes of one component of a state on the wire under ``codec``."""
    if codec == "fp16":
        return sum(2 * t.numel() for t in params.values())
    if codec == "int8":
        return sum(t.numel() + 4 for t in params.values())
    return sum(t.numel() * t.element_size() for t in params.values())
