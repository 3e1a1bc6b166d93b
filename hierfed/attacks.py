"""Attack simulators: a keyed fraction of the nodes of one tier behave maliciously.

Configured by the ``attack`` section (``name``, ``fraction``, ``tier``, ``options``). Which
nodes attack is a keyed draw — ``round(fraction x N)`` of the tier's N nodes, fixed for the
whole run — so the same seed attacks with the same nodes whatever the runtime.

Two kinds of attack:

* *model-update* attacks (``sign_flip``, ``scaling``, ``gaussian``, ``alie``) replace what a
  malicious sender puts on the wire. They are applied where the receiving tier node collects
  its children's updates, *before* validation (the receiver cannot tell them apart), because
  the strongest of them need the cohort's statistics: the simulated attackers are omniscient
  and colluding, the standard worst case of robustness benchmarks. A malicious sender skips
  the honest senders' postprocessing (clipping, noise): it controls its own wire.
* *data* attacks (``label_flip``) poison the client's training rows; the client then trains
  and sends honestly. Only leaf clients hold data, so ``label_flip`` needs the leaf tier.

Every attack keeps the sender's declared weight (validation bounds it), and changes the mean
delta ``d = tensors[c] / weights[c]`` of every component it sends:

==============  ==========================================================================
sign_flip       ``-scale * d``                                   (option ``scale``, 1)
scaling         ``scale * d``: a boosted update; ``scale = 0`` means n, the node's update
                count, the model-replacement boost of Bagdasaryan et al. (2020), which is
                harmless on its own when the boosted delta is benign (option ``scale``, 100)
gaussian        ``N(0, std^2)`` per coordinate, keyed by (seed, round, sender)  (``std``, 1)
alie            "A little is enough" (Baruch et al., 2019): ``mu - z * sigma`` per coordinate,
                mu/sigma over the node's benign updates; ``z = 0`` derives z from n and the
                number of attackers f as in the paper: ``s = floor(n/2 + 1) - f``,
                ``z = Phi^-1((n - s) / n)``                      (option ``z``, 0)
label_flip      classification labels ``y -> C - 1 - y``; regression targets negated
==============  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np
import torch

from hierfed.data.federation import ClientData, Federation, TaskSpec
from hierfed.errors import ConfigError
from hierfed.options import WithOptions, finite_nonneg
from hierfed.registry import Registry
from hierfed.seeding import np_rng, torch_gen
from hierfed.update import Update

ATTACKS: Registry = Registry("attack", entry_point_group="hierfed.attacks")

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "AttackPlan",
    "build_attack",
    "check_attack_config",
    "malicious_ids",
]


@dataclass(frozen=True)
class AttackContext:
    node_id: str  # the receiving node
    round: int
    seed: int
    num_updates: int  # updates the node received this node-round (n)
    num_malicious: int  # of them, malicious (f)


class Attack(WithOptions):
    """One attack; ``corrupt`` for model-update attacks, ``poison`` for data attacks."""

    poisons_data: ClassVar[bool] = False

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "attack.options") -> None:
        super().check_options(options, key)
        for k, v in options.items():
            if not finite_nonneg(v):
                raise ConfigError(f"{key}.{k}", v, "must be a finite number >= 0")

    def corrupt(self, update: Update, benign: Sequence[Update], ctx: AttackContext) -> Update:
        """What the malicious sender of ``update`` sends instead; ``benign`` are the benign
        updates the node's senders computed this node-round (attackers' own included)."""
        return update

    def poison(self, data: ClientData, tasks: Mapping[str, TaskSpec]) -> ClientData:
        """The training rows a malicious client trains on instead of ``data`` (not mutated)."""
        return data


def _map_mean(update: Update, fn: Any) -> Update:
    """Apply ``fn(component, param, mean_delta) -> new mean delta`` and re-weight."""
    tensors = {
        c: {p: fn(c, p, t / update.weights[c]) * update.weights[c] for p, t in ps.items()}
        for c, ps in update.tensors.items()
    }
    return Update(tensors, dict(update.weights), update.meta)


@ATTACKS.register("sign_flip")
class SignFlip(Attack):
    option_defaults = {"scale": 1.0}

    def corrupt(self, update, benign, ctx):
        s = float(self.options["scale"])
        return _map_mean(update, lambda c, p, d: -s * d)


@ATTACKS.register("scaling")
class Scaling(Attack):
    option_defaults = {"scale": 100.0}

    def corrupt(self, update, benign, ctx):
        s = float(self.options["scale"]) or float(ctx.num_updates)
        return _map_mean(update, lambda c, p, d: s * d)


@ATTACKS.register("gaussian")
class GaussianNoise(Attack):
    option_defaults = {"std": 1.0}

    def corrupt(self, update, benign, ctx):
        std = float(self.options["std"])
        sender = update.meta.senders[0] if update.meta.senders else ""
        g = torch_gen(ctx.seed, "attack-gaussian", ctx.round, sender)

        def noise(c: str, p: str, d: torch.Tensor) -> torch.Tensor:
            return torch.randn(d.shape, generator=g, dtype=torch.float32).to(d.dtype) * std

        # a fixed (sorted) order of draws, whatever the dict order
        tensors = {}
        for c in sorted(update.tensors):
            w = update.weights[c]
            tensors[c] = {
                p: noise(c, p, update.tensors[c][p]) * w for p in sorted(update.tensors[c])
            }
        return Update(tensors, dict(update.weights), update.meta)


@ATTACKS.register("alie")
class LittleIsEnough(Attack):
    option_defaults = {"z": 0.0}

    def z_value(self, n: int, f: int) -> float:
        z = float(self.options["z"])
        if z > 0:
            return z
        s = math.floor(n / 2 + 1) - f
        p = (n - s) / n if n else 0.5
        p = min(max(p, 0.5), 0.999)
        return NormalDist().inv_cdf(p)

    def corrupt(self, update, benign, ctx):
        z = self.z_value(ctx.num_updates, ctx.num_malicious)

        def fn(c: str, p: str, d: torch.Tensor) -> torch.Tensor:
            xs = [
                u.tensors[c][p] / u.weights[c]
                for u in benign
                if c in u.tensors and u.weights[c] > 0
            ]
            if len(xs) < 2:
                return d
            x = torch.stack(xs).double()
            return (x.mean(0) - z * x.std(0, unbiased=False)).to(d.dtype)

        return _map_mean(update, fn)


@ATTACKS.register("label_flip")
class LabelFlip(Attack):
    poisons_data = True

    def poison(self, data, tasks):
        labels: dict[str, np.ndarray] = {}
        for t, y in data.labels.items():
            spec = tasks[t]
            if spec.kind == "classification":
                labels[t] = (spec.num_classes - 1 - y).astype(y.dtype)
            else:
                labels[t] = (-y).astype(y.dtype)
        return ClientData(dict(data.inputs), labels)


@dataclass(frozen=True)
class AttackPlan:
    """The configured attack and the fixed set of malicious node ids."""

    attack: Attack
    malicious: frozenset[str]
    tier: str


def malicious_ids(fed: Federation, tier: str, fraction: float, seed: int) -> frozenset[str]:
    """``round(fraction x N)`` node ids of ``tier`` (a tier of ``fed``), by a keyed draw."""
    if tier not in fed.tier_names:
        raise ConfigError(
            "attack.tier",
            tier,
            f"give a tier of this federation: {list(fed.tier_names)} ('' = the leaf tier)",
        )
    lvl = fed.tier_names.index(tier)
    ids = sorted(
        {
            "/".join(c.path[: lvl + 1]) if lvl < len(fed.tier_names) - 1 else c.id
            for c in fed.clients
        }
    )
    k = int(math.floor(fraction * len(ids) + 0.5))
    if k == 0:
        return frozenset()
    rng = np_rng(seed, "attack", tier)
    return frozenset(ids[i] for i in rng.permutation(len(ids))[:k])


def build_attack(cfg: Any, fed: Federation) -> AttackPlan | None:
    """The run's AttackPlan, or None when no attack is configured."""
    a = cfg.attack
    if a.name == "none" or a.fraction <= 0:
        return None
    tier = a.tier or fed.tier_names[-1]
    attack = ATTACKS.get(a.name)(dict(a.options))
    if attack.poisons_data and tier != fed.tier_names[-1]:
        raise ConfigError(
            "attack.tier",
            tier,
            f"'{a.name}' poisons training data; only the leaf tier '{fed.tier_names[-1]}' has data",
        )
    return AttackPlan(attack, malicious_ids(fed, tier, a.fraction, cfg.seed), tier)


def check_attack_config(cfg: Any) -> None:
    """Config-time checks of the ``attack`` section (called by ``validate_config``)."""
    a = cfg.attack
    if a.name != "none":
        if a.name not in ATTACKS:
            raise ConfigError("attack.name", a.name, f"known: none, {', '.join(ATTACKS.names())}")
        ATTACKS.get(a.name).check_options(dict(a.options), key="attack.options")
    elif a.options:
        raise ConfigError(
            "attack.options", dict(a.options), "options given but attack.name is 'none'"
        )
    f = a.fraction
    if not isinstance(f, (int, float)) or math.isnan(f) or not (0 <= f < 1):
        raise ConfigError("attack.fraction", f, "must be a fraction in [0, 1)")


def poisoned(
    plan: AttackPlan | None, client_id: str, data: ClientData, tasks: Mapping[str, TaskSpec]
) -> ClientData:
    """The rows ``client_id`` trains on: poisoned if it is a malicious client of a data attack."""
    if plan is None or not plan.attack.poisons_data or client_id not in plan.malicious:
        return data
    return plan.attack.poison(data, tasks)


def attack_pool(
    plan: AttackPlan | None,
    senders: Sequence[str],
    pool: Mapping[str, Update],
    *,
    node_id: str,
    round: int,
    seed: int,
) -> Mapping[str, Update]:
    """``pool`` with the updates of this node's malicious ``senders`` replaced by what they
    send instead (model-update attacks); ``pool`` itself is not mutated."""
    if plan is None or plan.attack.poisons_data:
        return pool
    present = [s for s in sorted(senders) if s in pool]
    bad = [s for s in present if s in plan.malicious]
    if not bad:
        return pool
    benign = [pool[s] for s in present]
    ctx = AttackContext(node_id, round, seed, len(present), len(bad))
    out = dict(pool)
    for s in bad:
        out[s] = plan.attack.corrupt(pool[s], benign, ctx)
    return out
