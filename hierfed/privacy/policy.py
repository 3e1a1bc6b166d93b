"""Privacy policies: which clients train with DP-SGD, under which budget and noise.

A client's policy is, in order: its profile's ``privacy`` field, the first ``privacy.assign``
glob that matches its id (``global/inst-00/*`` assigns a whole institution — a jurisdiction),
``privacy.default``; an empty name means no DP. A policy is tightened per modality: a client
holding a modality listed in ``policy.modalities`` gets the smallest epsilon among them.

Why tighten the whole client, not just the modality's encoder: every gradient — adapters,
heads, prompts — depends on every modality of the row through the forward pass, so a
separate, smaller budget for ``encoder.image`` alone would not protect the images.

The noise multiplier is derived with Opacus (``get_noise_multiplier``) so that the planned
participations exactly fit the budget::

    steps per participation = local_epochs x tasks x ceil(1 / q),   q = min(1, batch_size / n)
    planned participations  = policy.rounds, or rounds x product of local_rounds of the
                              tiers between the root and the clients (every round, the most
                              a client can take part)
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

from hierfed.data.federation import ClientProfile
from hierfed.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPPlan:
    """Everything a worker needs to train one client with DP-SGD."""

    policy: str
    epsilon: float  # the client's budget (after per-modality tightening)
    delta: float
    clip_norm: float
    noise_multiplier: float
    sample_rate: float  # Poisson sampling rate of one step
    steps_per_round: int  # optimizer steps of one participation
    planned_rounds: int


def policy_name(cfg: Any, profile: ClientProfile) -> str:
    """The name of the client's privacy policy ('' = none)."""
    if profile.privacy:
        return profile.privacy
    for pattern, name in cfg.privacy.assign.items():
        if fnmatch.fnmatchcase(profile.id, pattern):
            return name
    return cfg.privacy.default


_LARGEST_ALPHA = "Optimal order is the largest alpha"


@functools.lru_cache(maxsize=4096)
def _derive_sigma(epsilon: float, delta: float, q: float, steps: int) -> float:
    """The noise multiplier whose RDP epsilon after ``steps`` steps at rate ``q`` is ``epsilon``.

    Why Opacus's "optimal order is the largest alpha" warning is silenced here, and the RDP
    orders are not widened: the warning came from the bisection's probes, not from the answer.
    Opacus starts at sigma = 20 and halves towards the answer; at those large sigmas (and small
    ``q``) the best order lies above Opacus's largest (63), on every DP run with realistic data
    sizes. A probe's epsilon is far below the target either way, so no decision of the search
    changes, and no probe is ever reported. Widening the orders would not silence it (the
    best order of a probe grows with sigma / q without bound), and it would have to widen the
    accountant's orders too (``privacy/accountant.py`` reports epsilon with Opacus's), else a
    sigma derived over wider orders could exceed the budget as the accountant counts it. The
    answer itself is checked: if its best order is the largest, that is logged (see
    ``_check_order``)."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LARGEST_ALPHA)
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant="rdp",
                epsilon_tolerance=0.005,
            )
        )
    _check_order(sigma, q, steps, delta)
    return sigma


def _check_order(sigma: float, q: float, steps: int, delta: float) -> float:
    """The RDP order at which the derived plan's epsilon is reached; logs a warning when it is
    Opacus's largest (the bound, and so the noise, is then larger than a wider range would
    give)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LARGEST_ALPHA)
        _, best = get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    if best == max(orders):
        log.warning(
            "DP-SGD plan (sigma %.3f, q %.4g, %d steps): its epsilon is reached at the largest RDP "
            "order Opacus tries (%s), so the bound is looser and the noise larger than needed",
            sigma,
            q,
            steps,
            max(orders),
        )
    return float(best)


def planned_participations(cfg: Any, tier_names: tuple[str, ...]) -> int:
    per_round = 1
    for name in tier_names[1:-1]:
        per_round *= cfg.tier(name).local_rounds
    # device-to-device gossip among the leaves: that many training passes per parent round
    per_round *= cfg.topology.leaf_passes(tier_names[-1])
    return cfg.rounds * per_round


def plan_for(
    cfg: Any, profile: ClientProfile, num_rows: int, tier_names: tuple[str, ...]
) -> DPPlan | None:
    """The client's DP-SGD plan, or None when no policy applies to it."""
    name = policy_name(cfg, profile)
    if not name:
        return None
    pol = cfg.privacy.policies[name]
    eps = float(pol.epsilon)
    for m, e in pol.modalities.items():
        if m in profile.modalities:
            eps = min(eps, float(e))
    q = min(1.0, cfg.train.batch_size / max(num_rows, 1))
    steps = cfg.train.local_epochs * len(profile.tasks) * int(math.ceil(1.0 / q - 1e-9))
    planned = pol.rounds or planned_participations(cfg, tier_names)
    sigma = float(pol.noise_multiplier) or _derive_sigma(eps, float(pol.delta), q, steps * planned)
    return DPPlan(name, eps, float(pol.delta), float(pol.clip_norm), sigma, q, steps, planned)


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_privacy_config(cfg: Any) -> None:
    """Config-time checks of the ``privacy`` section (called by ``validate_config``)."""
    pc = cfg.privacy
    for name, pol in pc.policies.items():
        key = f"privacy.policies.{name}"
        if not _finite(pol.epsilon) or pol.epsilon <= 0:
            raise ConfigError(f"{key}.epsilon", pol.epsilon, "must be a finite number > 0")
        if not _finite(pol.delta) or not (0 < pol.delta < 1):
            raise ConfigError(
                f"{key}.delta", pol.delta, "must lie strictly between 0 and 1 (e.g. 1e-5)"
            )
        if not _finite(pol.clip_norm) or pol.clip_norm <= 0:
            raise ConfigError(f"{key}.clip_norm", pol.clip_norm, "must be a finite number > 0")
        if not _finite(pol.noise_multiplier) or pol.noise_multiplier < 0:
            raise ConfigError(
                f"{key}.noise_multiplier",
                pol.noise_multiplier,
                "must be a finite number >= 0 (0 = derive it from epsilon, delta and the rounds)",
            )
        if not isinstance(pol.rounds, int) or pol.rounds < 0:
            raise ConfigError(
                f"{key}.rounds", pol.rounds, "must be an integer >= 0 (0 = every round of the run)"
            )
        for m, e in pol.modalities.items():
            if not _finite(e) or e <= 0:
                raise ConfigError(f"{key}.modalities.{m}", e, "must be a finite epsilon > 0")
    known = sorted(pc.policies)
    for pattern, name in pc.assign.items():
        if name and name not in pc.policies:
            raise ConfigError(
                f"privacy.assign.{pattern}",
                name,
                f"no such policy; known: {known or '(none defined)'}",
            )
    if pc.default and pc.default not in pc.policies:
        raise ConfigError(
            "privacy.default", pc.default, f"no such policy; known: {known or '(none defined)'}"
        )


def update_noise_variance(plan: DPPlan, *, lr: float, num_rows: int) -> float:
    """Per-coordinate variance of the DP-SGD noise in one participation's delta, for plain
    SGD without momentum: each step adds ``N(0, (sigma C)^2) / B`` to the gradient (``B`` the
    expected batch size) and moves the parameters by ``-lr`` times it, so over the steps

        Var = steps x (lr x sigma x C / B)^2.

    (Adam rescales the noise per coordinate; then estimate the variance instead.)"""
    b = max(1, int(round(plan.sample_rate * num_rows)))
    return plan.steps_per_round * (lr * plan.noise_multiplier * plan.clip_norm / b) ** 2
