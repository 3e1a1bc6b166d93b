"""Server optimizers: how a tier node applies the merged mean delta to its own state.

``sgd`` with ``server_lr=1`` is plain FedAvg (x + mean delta). FedAvgM, FedAdam and FedYogi
follow Reddi et al., "Adaptive Federated Optimization" (2021), treating the negated mean
delta as a pseudo-gradient. Usable at any tier. State is explicit: a dict of tensors per
component, created on first use, returned, never mutated in place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from hierfed.config import TierConfig
from hierfed.registry import SERVER_OPTIMIZERS
from hierfed.update import State


class ServerOptimizer(ABC):
    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier

    @abstractmethod
    def step(
        self, params: State, delta: State, state: dict[str, Any] | None
    ) -> tuple[State, dict[str, Any] | None]:
        """New values for the components in ``delta`` (others in ``params`` unchanged)."""


def _apply(params: State, delta: State, fn) -> State:
    out: State = {c: dict(p) for c, p in params.items()}
    for c, dp in delta.items():
        out[c] = {p: fn(c, p, params[c][p], d) for p, d in dp.items()}
    return out


@SERVER_OPTIMIZERS.register("sgd")
class ServerSGD(ServerOptimizer):
    """x <- x + lr * delta (lr = 1: FedAvg)."""

    def step(self, params, delta, state):
        lr = self.tier.server_lr
        return _apply(params, delta, lambda c, p, x, d: x + lr * d if lr != 1.0 else x + d), state


@SERVER_OPTIMIZERS.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """m <- beta m + delta;  x <- x + lr m."""

    def step(self, params, delta, state):
        mom = dict((state or {}).get("m", {}))
        beta, lr = self.tier.server_momentum, self.tier.server_lr
        new_m: dict[str, torch.Tensor] = dict(mom)

        def fn(c, p, x, d):
            key = f"{c}/{p}"
            m = beta * mom[key] + d if key in mom else d.clone()
            new_m[key] = m
            return x + lr * m

        return _apply(params, delta, fn), {"m": new_m}


class _Adaptive(ServerOptimizer):
    def _second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, params, delta, state):
        st = state or {}
        ms, vs = dict(st.get("m", {})), dict(st.get("v", {}))
        b1, lr, tau = self.tier.beta1, self.tier.server_lr, self.tier.tau
        new_m, new_v = dict(ms), dict(vs)

        def fn(c, p, x, d):
            key = f"{c}/{p}"
            m = b1 * ms[key] + (1 - b1) * d if key in ms else (1 - b1) * d
            v = self._second(vs[key] if key in vs else torch.full_like(d, tau * tau), d * d)
            new_m[key], new_v[key] = m, v
            return x + lr * m / (v.sqrt() + tau)

        return _apply(params, delta, fn), {"m": new_m, "v": new_v}


@SERVER_OPTIMIZERS.register("fedadam")
class FedAdam(_Adaptive):
    """v <- beta2 v + (1 - beta2) d^2;  x <- x + lr m / (sqrt(v) + tau)."""

    def _second(self, v, d2):
        return self.tier.beta2 * v + (1 - self.tier.beta2) * d2


@SERVER_OPTIMIZERS.register("fedyogi")
class FedYogi(_Adaptive):
    """v <- v - (1 - beta2) d^2 sign(v - d^2) (Yogi's additive second moment)."""

    def _second(self, v, d2):
        return v - (1 - self.tier.beta2) * d2 * torch.sign(v - d2)
