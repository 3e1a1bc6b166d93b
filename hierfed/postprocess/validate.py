"""Validation of every incoming update, at every tier, before clipping or merging.

What an accepted update satisfies (the merge may then trust it):

* exactly the expected components (a client) or a non-empty subset (a tier node), each with
  exactly the spec's parameter names and shapes (no broadcasting);
* every value a dense (strided) tensor on the receiver's device with the receiver's dtype
  (float32 by default): no sparse or ``meta`` tensors, no silent promotion to float64 and no
  float16 that would turn the merged model's dtype;
* every value finite, and so is the sender's mean ``tensors / weight`` (computed in float64,
  and it must fit the dtype): a tiny weight cannot blow a finite delta up to Inf;
* weights bounded on both sides: ``MIN_WEIGHT <= w <= max_weight``.

A sum of valid updates can still overflow; the merge checks its result too
(``hierfed.runtime.merge``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hierfed.errors import UpdateRejected
from hierfed.model.spec import ModelSpec
from hierfed.update import Update

# the smallest weight an update may carry: weights are sample counts (>= 1 per client) and
# their mixtures; below this a sender's mean delta is its tensors times > 1e6
MIN_WEIGHT = 1e-6
DEFAULT_DTYPE = torch.float32


@dataclass(frozen=True)
class Expectation:
    """What a receiver expects from one sender."""

    sender: str
    components: frozenset[str]  # allowed components
    exact: bool  # True: exactly these components (a client); False: a non-empty subset (a tier)
    max_weight: float  # a weight above this is abusive (e.g. more samples than the sender has)
    min_weight: float = MIN_WEIGHT  # a weight below this is refused (it would amplify the delta)
    rank: int | None = None  # a lower-rank client's LoRA rank (what its codecs sent), else None


def _check_tensor(
    sender: str, name: str, t: object, shape: tuple[int, ...], like: torch.Tensor | None
) -> torch.Tensor:
    """Type, layout, device, dtype, shape and finiteness of one tensor; returns it."""
    if not isinstance(t, torch.Tensor):
        raise UpdateRejected(sender, f"{name}: not a tensor ({type(t).__name__})")
    if t.layout != torch.strided:
        raise UpdateRejected(sender, f"{name}: layout {t.layout} is not a dense (strided) tensor")
    device = like.device if like is not None else torch.device("cpu")
    if t.device != device:
        raise UpdateRejected(sender, f"{name}: on device {t.device}, expected {device}")
    dtype = like.dtype if like is not None else DEFAULT_DTYPE
    if not t.is_floating_point():
        raise UpdateRejected(sender, f"{name}: dtype {t.dtype} is not floating point")
    if t.dtype != dtype:
        raise UpdateRejected(sender, f"{name}: dtype {t.dtype} != expected {dtype}")
    if tuple(t.shape) != shape:
        raise UpdateRejected(sender, f"{name}: shape {tuple(t.shape)} != expected {shape}")
    if not bool(torch.isfinite(t).all()):
        raise UpdateRejected(sender, f"{name}: contains NaN or Inf")
    return t


def _check_weight(sender: str, c: str, w: object, expect: Expectation) -> float:
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
        raise UpdateRejected(sender, f"{c}: weight {w!r} is not a finite positive number")
    if w < expect.min_weight:
        raise UpdateRejected(
            sender,
            f"{c}: weight {w!r} is below the minimum {expect.min_weight} (it would amplify the delta)",
        )
    if w > expect.max_weight * (1 + 1e-9):
        raise UpdateRejected(
            sender, f"{c}: weight {w} exceeds the sender's bound {expect.max_weight}"
        )
    return float(w)


def validate_update(
    update: Update,
    expect: Expectation,
    spec: ModelSpec,
    like: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Raise UpdateRejected with the reason if ``update`` is malformed; never mutates it.

    ``like``: the receiver's current state; when given, tensors must match its dtypes and
    devices (else float32 on the CPU)."""
    sender = expect.sender
    if not isinstance(update, Update):
        raise UpdateRejected(sender, f"not an Update ({type(update).__name__})")
    comps = set(update.tensors)
    if set(update.weights) != comps:
        raise UpdateRejected(sender, "weights and tensors name different components")
    if expect.exact and comps != expect.components:
        missing, extra = sorted(expect.components - comps), sorted(comps - expect.components)
        raise UpdateRejected(
            sender, f"component set differs from the sender's: missing {missing}, extra {extra}"
        )
    if not expect.exact:
        extra = sorted(comps - expect.components)
        if extra:
            raise UpdateRejected(sender, f"unexpected components {extra}")
        if not comps:
            raise UpdateRejected(sender, "empty update")
    for c in sorted(comps):
        cspec = spec.components.get(c)
        if cspec is None:
            raise UpdateRejected(sender, f"unknown component '{c}'")
        shapes: Mapping[str, tuple[int, ...]] = dict(cspec.shapes)
        params = update.tensors[c]
        if set(params) != set(shapes):
            raise UpdateRejected(
                sender,
                f"{c}: parameter keys differ (missing {sorted(set(shapes) - set(params))[:3]}, "
                f"extra {sorted(set(params) - set(shapes))[:3]})",
            )
        w = _check_weight(sender, c, update.weights[c], expect)
        mine = like.get(c) if like is not None else None
        for p in sorted(params):
            ref = mine.get(p) if mine is not None else None
            t = _check_tensor(sender, f"{c}/{p}", params[p], shapes[p], ref)
            if t.numel() and float(t.double().abs().max()) / w > torch.finfo(t.dtype).max:
                raise UpdateRejected(
                    sender, f"{c}/{p}: its mean (tensor / weight {w!r}) overflows {t.dtype}"
                )
