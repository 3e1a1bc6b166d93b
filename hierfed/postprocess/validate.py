"""Validation of every incoming update, at every tier, before clipping or merging."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hierfed.errors import UpdateRejected
from hierfed.model.spec import ModelSpec
from hierfed.update import Update


@dataclass(frozen=True)
class Expectation:
    """What a receiver expects from one sender."""

    sender: str
    components: frozenset[str]  # allowed components
    exact: bool  # True: exactly these components (a client); False: a non-empty subset (a tier)
    max_weight: float  # a weight above this is abusive (e.g. more samples than the sender has)


def validate_update(update: Update, expect: Expectation, spec: ModelSpec) -> None:
    """Raise UpdateRejected with the reason if ``update`` is malformed; never mutates it."""
    sender = expect.sender
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
        for p, t in params.items():
            if not isinstance(t, torch.Tensor):
                raise UpdateRejected(sender, f"{c}/{p}: not a tensor ({type(t).__name__})")
            if tuple(t.shape) != shapes[p]:
                raise UpdateRejected(
                    sender, f"{c}/{p}: shape {tuple(t.shape)} != expected {shapes[p]}"
                )
            if not t.is_floating_point():
                raise UpdateRejected(sender, f"{c}/{p}: dtype {t.dtype} is not floating point")
            if not bool(torch.isfinite(t).all()):
                raise UpdateRejected(sender, f"{c}/{p}: contains NaN or Inf")
        w = update.weights[c]
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
            raise UpdateRejected(sender, f"{c}: weight {w!r} is not a finite positive number")
        if w > expect.max_weight * (1 + 1e-9):
            raise UpdateRejected(
                sender, f"{c}: weight {w} exceeds the sender's bound {expect.max_weight}"
            )
