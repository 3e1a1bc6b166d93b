"""Who takes part in a node-round: participation sampling and dropouts, keyed draws.

One rule for every topology (trees at every tier, gossip over its nodes): a node samples
``ceil(p * n)`` of its ``n`` members (at least one), drawn without replacement by a generator
keyed by ``(seed, "sample", round, *key, node)``; then each sampled member drops out with
probability ``dropout`` by a draw keyed by ``(seed, "dropout", round, *key, node)``.

Example::

    >>> members = [f"s{i}" for i in range(10)]
    >>> sample_size(0.25, len(members))
    3
    >>> sample(seed=0, node="inst", members=members, p=0.25, rnd=1, key=(0,))
    ['s0', 's2', 's6']
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from hierfed.config import TierConfig
from hierfed.seeding import np_rng


def sample_size(p: float, n: int) -> int:
    """How many of ``n`` members a node samples at participation ``p`` in (0, 1]."""
    return min(n, max(1, int(math.ceil(p * n - 1e-9))))


def sample(
    *, seed: int, node: str, members: Sequence[str], p: float, rnd: int, key: Sequence[object]
) -> list[str]:
    """The members ``node`` samples this node-round, sorted like ``members``' ids."""
    m = sample_size(p, len(members))
    if m >= len(members):
        return list(members)
    rng = np_rng(seed, "sample", rnd, *key, node)
    return sorted(members[i] for i in rng.choice(len(members), size=m, replace=False))


def dropouts(
    *, seed: int, node: str, members: Sequence[str], p: float, rnd: int, key: Sequence[object]
) -> set[str]:
    """Of ``members`` (sampled, in order), those that drop out after the broadcast."""
    if p <= 0 or not members:
        return set()
    u = np_rng(seed, "dropout", rnd, *key, node).random(len(members))
    return {c for c, x in zip(members, u) if x < p}


@dataclass(frozen=True)
class Draw:
    """Who takes part in one node-round of one node."""

    full: list[str]  # sampled, excluded members included
    sampled: list[str]  # sampled and not excluded: they get the broadcast
    gone: set[str]  # of those, the ones that drop out after it


def draw(
    *,
    seed: int,
    node: str,
    members: Sequence[str],
    tier: TierConfig,
    rnd: int,
    key: Sequence[object],
    excluded: Collection[str] = (),
) -> Draw:
    """Sampling, exclusion and dropouts of one node-round. Excluded members (``exclude``,
    unlearning) are drawn like everyone, so the others' sample and dropout draws stay as they
    were, and dropped before the broadcast: no bytes, no training, no wait, no weight."""
    full = sample(seed=seed, node=node, members=members, p=tier.participation, rnd=rnd, key=key)
    sampled = [c for c in full if c not in excluded]
    gone = dropouts(seed=seed, node=node, members=full, p=tier.dropout, rnd=rnd, key=key)
    return Draw(full, sampled, gone.difference(excluded))
