"""What a round did (``RoundStats``) and what every client carries between rounds (``ClientStore``).

``RoundStats.absorb`` is the one place a trained client's result enters the round: its DP
accountant state is carried (whatever the topology), its local components kept, its loss
counted; a client whose DP budget is spent sits out. Trees and gossip both call it, so privacy
accounting cannot drift apart between topologies again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hierfed.errors import NodeFailure
from hierfed.runtime.jobs import ClientMeta
from hierfed.update import State


@dataclass
class ClientStore:
    """Per-client state carried across rounds and checkpoints: components that never leave the
    client (``local``) and its DP accountant (``privacy``, a ``privacy.PrivacyState``); and
    per sender (a client or a tier node) its codec memory (``codec``: top-k's error-feedback
    residual, ``hierfed.postprocess.codecs``)."""

    local: dict[str, State] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    codec: dict[str, State] = field(default_factory=dict)

    def memory_of(self, senders: list[str]) -> dict[str, State]:
        """The codec memories of ``senders`` that have one (what their receiver's merge needs)."""
        return {s: self.codec[s] for s in senders if s in self.codec}


@dataclass
class RoundStats:
    """What one round did, for metrics."""

    participants: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    rejections: list[tuple[str, str]] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_rows: int = 0
    privacy: dict[str, dict[str, Any]] = field(default_factory=dict)  # DP report per client
    dropped: list[str] = field(default_factory=list)  # sampled children that dropped out
    late: list[str] = field(default_factory=list)  # past their parent's deadline: never merged
    sim_time_s: float = 0.0  # simulated wall-clock time of the round (hierfed/clock.py)
    # sender -> leave-one-out influence summed over its node-rounds (``eval.contributions``)
    contributions: dict[str, float] = field(default_factory=dict)

    @property
    def train_loss(self) -> float:
        return self.loss_sum / self.loss_rows if self.loss_rows else float("nan")

    def contributed(self, influence: dict[str, float]) -> None:
        """Add one merge's per-sender leave-one-out influence to the round's."""
        for sender, v in influence.items():
            self.contributions[sender] = self.contributions.get(sender, 0.0) + v

    def failed(self, meta: ClientMeta) -> bool:
        """Record ``meta``'s failure, if it failed."""
        if meta.error is None:
            return False
        self.failures.append((meta.client_id, meta.error.splitlines()[0]))
        return True

    def absorb(self, meta: ClientMeta, clients: ClientStore) -> bool:
        """Fold a client's result (not failed) into the round; True if it trained.

        Carries its DP accountant and local components into ``clients``; a client whose
        budget is spent sat out (reported in ``privacy``, not counted, sends nothing)."""
        cid = meta.client_id
        if meta.privacy is not None:
            clients.privacy[cid] = meta.privacy
            self.privacy[cid] = meta.privacy.report()
        if meta.local:
            clients.local[cid] = meta.local
        if meta.privacy is not None and meta.privacy.status == "budget_spent":
            return False
        self.loss_sum += meta.loss * meta.num_samples
        self.loss_rows += meta.num_samples
        return True


def quorum_failure(
    expected: set[str], accepted: int, quorum: float, stats: RoundStats
) -> str | None:
    """Why a node-round that expected ``expected`` senders and accepted ``accepted`` of their
    updates misses its ``quorum`` (a fraction), or None."""
    if not expected or accepted >= quorum * len(expected) - 1e-9:
        return None
    why = [f"{c}: {r}" for c, r in stats.failures if c in expected][:3]
    why += [f"{c}: rejected ({r})" for c, r in stats.rejections if c in expected][:3]
    return f"quorum {quorum:g} not met: {accepted}/{len(expected)} updates arrived and passed" + (
        f" ({'; '.join(why)})" if why else ""
    )


def require_no_failures(stats: RoundStats, rnd: int, *, tolerate: bool = False) -> None:
    """Raise NodeFailure for the round's first failed client unless failures are tolerated."""
    if stats.failures and not tolerate:
        cid, cause = stats.failures[0]
        raise NodeFailure(cid, rnd, cause)
