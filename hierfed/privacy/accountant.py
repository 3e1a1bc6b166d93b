"""Privacy accounting with Opacus's RDP accountant, in a form that travels with the client.

The accountant of a privacy unit *is* its history of ``(noise_multiplier, sample_rate, steps)``
entries (Opacus's ``RDPAccountant.history``). ``PrivacyState`` carries that history as a
plain tuple from round to round — in ``TrainJob.privacy`` to the worker that trains the
client, back in ``ClientMeta.privacy`` — so one accountant per client spans the whole run,
never a fresh one per round, whichever worker trains the client.

Example::

    >>> s = PrivacyState.empty("p", 1e-5)
    >>> s = s.after(((1.5, 0.04, 2250),))
    >>> round(s.epsilon, 4)
    7.3291
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opacus.accountants import RDPAccountant


History = tuple[tuple[float, float, int], ...]


def accountant_of(history: Iterable[tuple[float, float, int]]) -> RDPAccountant:
    """An Opacus RDPAccountant holding ``history`` (the persistent state, rebuilt in place)."""
    from opacus.accountants import RDPAccountant  # imported when DP is used: keeps start-up light

    acc = RDPAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return acc


def epsilon_of(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of the composed history at ``delta`` (0 for an empty history)."""
    if not history:
        return 0.0
    return float(accountant_of(history).get_epsilon(delta=delta))


def merge_history(history: Iterable[tuple[float, float, int]]) -> History:
    """Merge consecutive entries with the same (sigma, q), as Opacus's ``step`` does."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + int(n))
        else:
            out.append((float(s), float(q), int(n)))
    return tuple(out)


@dataclass(frozen=True)
class PrivacyState:
    """One privacy unit's accountant state and its last report; small and serializable."""

    policy: str
    delta: float
    history: History = ()
    epsilon: float = 0.0
    budget: float = math.inf
    participations: int = 0
    status: str = "ok"  # ok | budget_spent
    unit: str = "sample"  # what epsilon protects: one row of the client's data

    @classmethod
    def empty(cls, policy: str, delta: float, budget: float = math.inf) -> PrivacyState:
        return cls(policy, delta, (), 0.0, budget)

    def after(self, steps: Iterable[tuple[float, float, int]]) -> PrivacyState:
        """The state after one more participation that took ``steps``."""
        hist = merge_history((*self.history, *steps))
        return replace(
            self,
            history=hist,
            epsilon=epsilon_of(hist, self.delta),
            participations=self.participations + 1,
            status="ok",
        )

    def spent(self) -> PrivacyState:
        return replace(self, status="budget_spent")

    def report(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "budget": self.budget,
            "unit": self.unit,
            "policy": self.policy,
            "participations": self.participations,
            "status": self.status,
        }


def client_level_report(
    cfg: Any, tier_names: Sequence[str], rounds_done: int
) -> dict[str, dict[str, Any]]:
    """Client-level epsilon after ``rounds_done`` root rounds for every tier edge whose
    receiving tier runs the ``gaussian`` postprocessor.

    The unit is the *sending* tier's node (a student into ``institution``, an institution into
    ``global``). Each node-round of the receiving tier is one subsampled Gaussian mechanism
    with ``q`` = the receiving tier's participation and ``sigma`` = the postprocessor's noise
    multiplier; a root round holds the product of ``local_rounds`` of the tiers from the root's
    children down to the receiving tier. Counting every node-round (also those in which the
    receiving node itself was not sampled by its parent) is conservative.
    """
    out: dict[str, dict[str, Any]] = {}
    per_round = 1
    uncovered = gossip_uncovered(cfg, tier_names)
    for lvl, name in enumerate(tier_names[:-1]):
        tier = cfg.tier(name)
        if lvl > 0:
            per_round *= tier.local_rounds
        if "gaussian" not in tier.postprocess:
            continue
        opts = dict(tier.postprocess_options.get("gaussian", {}))
        sigma = float(opts.get("noise_multiplier", 1.0))
        delta = float(opts.get("delta", 1e-5))
        steps = rounds_done * per_round
        q = float(tier.participation)
        eps = (
            epsilon_of(((sigma, q, steps),), delta)
            if steps and sigma > 0
            else (math.inf if steps else 0.0)
        )
        out[name] = {
            "unit": tier_names[lvl + 1],
            "level": "client",
            "epsilon": eps,
            "delta": delta,
            "noise_multiplier": sigma,
            "sample_rate": q,
            "steps": steps,
        }
        if tier.secure_aggregation != "none":  # composes: each sender noises, then masks
            out[name]["secure_aggregation"] = (
                f"{tier.secure_aggregation}: each {tier_names[lvl + 1]} adds its noise before "
                "masking; the server sees only the masked sum (epsilon is the per-sender bound, "
                "not amplified by the sum)"
            )
        if name in uncovered:  # no bound is claimed: say so, and why
            out[name]["epsilon"] = math.inf
            out[name]["not_covered"] = uncovered[name]
    return out


def gossip_uncovered(cfg: Any, tier_names: Sequence[str]) -> dict[str, str]:
    """Tier edges whose client-level DP (``gaussian``) the senders' own gossip undoes.

    When the members of the sending tier mix with each other (``peer_steps`` on an inner
    tier, or ``topology.tiers.<leaf>.peer_steps`` for device-to-device leaves), they exchange
    un-noised values, and each update sent up carries its neighbours' data as well as the
    sender's: the per-sender Gaussian accounting holds for neither. The report then gives
    epsilon = inf with this reason instead of a bound it cannot back."""
    out: dict[str, str] = {}
    topo = cfg.topology
    if topo.name == "gossip":  # no tiers to send up to: its mixing is the whole algorithm
        return out
    for lvl, name in enumerate(tier_names[:-1]):
        if "gaussian" not in cfg.tier(name).postprocess:
            continue
        unit = tier_names[lvl + 1]
        if unit == tier_names[-1]:
            peers = topo.leaf_peers(unit)
            key = f"topology.tiers.{unit}.peer_steps"
        else:
            peers = cfg.tier(unit) if cfg.tier(unit).peer_steps > 0 else None
            key = f"peer_steps of tier {unit}"
        if peers is not None:
            out[name] = (
                f"the {unit} nodes gossip among themselves ({key}={peers.peer_steps}): they "
                "exchange un-noised values, and every update sent up mixes the neighbours' "
                "data, so no client-level epsilon is claimed for this edge"
            )
    return out


def privacy_metrics(
    cfg: Any,
    tier_names: Sequence[str],
    rnd: int,
    round_reports: dict[str, dict[str, Any]],
    seen: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The privacy fields of round ``rnd``'s metrics record (empty when no DP is configured).

    ``round_reports``: the DP report of each client trained this round; ``seen`` (updated in
    place by the caller's loop, one dict per run) keeps every client's latest report, so each
    round lists the cumulative epsilon of every DP client, with its unit and delta.
    ``dp_sample.sat_out`` names the clients that stopped contributing this round (budget spent).
    """
    out: dict[str, Any] = {}
    seen.update(round_reports)
    if seen:
        eps = [r["epsilon"] for r in seen.values()]
        out["dp_sample"] = {
            "unit": "sample",
            "clients": {c: dict(r) for c, r in sorted(seen.items())},
            "max_epsilon": max(eps),
            "spent": sorted(c for c, r in seen.items() if r["status"] == "budget_spent"),
            "sat_out": sorted(c for c, r in round_reports.items() if r["status"] == "budget_spent"),
        }
    client = client_level_report(cfg, tier_names, rnd)
    if client:
        out["dp_client"] = client
    return out
