"""Who takes part in a node-round: participation sampling and dropouts, keyed draws.

One rule for every topology (trees at every tier, gossip over its nodes): a node samples
``ceil(p * n)`` of its ``n`` members (at least one), drawn without replacement by a generator
keyed by ``(seed, "sample", round, *key, node)``; then each sampled member drops out with
probability ``dropout`` by a draw keyed by ``(seed, "dropout", round, *key, node)``.

With ``sampling: by_resource`` (a tier whose members are clients) the sample is stratified
by the members' resource class: each class gets its share of the ``ceil(p * n)`` seats
(largest remainders first), every non-empty class at least one while there are as many seats
as classes, and each class is drawn by its own keyed generator ``(..., node, class)``. Light,
resource-constrained clients then stay represented in every round instead of by chance.

Example::

    >>> members = [f"s{i}" for i in range(10)]
    >>> sample_size(0.25, len(members))
    3
    >>> sample(seed=0, node="inst", members=members, p=0.25, rnd=1, key=(0,))
    ['s0', 's2', 's6']
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from hierfed.config import TierConfig
from hierfed.seeding import np_rng


def sample_size(p: float, n: int) -> int:
    """How many of ``n`` members a node samples at participation ``p`` in (0, 1]."""
    return min(n, max(1, int(math.ceil(p * n - 1e-9))))


def sample(
    *,
    seed: int,
    node: str,
    members: Sequence[str],
    p: float,
    rnd: int,
    key: Sequence[object],
    classes: Mapping[str, str] | None = None,
) -> list[str]:
    """The members ``node`` samples this node-round, sorted by id; ``classes`` (member ->
    resource class): stratified by class (module docstring)."""
    m = sample_size(p, len(members))
    if m >= len(members):
        return list(members)
    if classes is not None:
        return _stratified(seed, node, members, classes, m, rnd, key)
    rng = np_rng(seed, "sample", rnd, *key, node)
    return sorted(members[i] for i in rng.choice(len(members), size=m, replace=False))


def seats(m: int, counts: Mapping[str, int]) -> dict[str, int]:
    """How many of ``m`` seats each class gets: its proportional share, rounded down, then the
    largest remainders (ties by class name); every class at least one when ``m`` allows.

    >>> seats(3, {"full": 98, "light": 2})
    {'full': 2, 'light': 1}
    >>> seats(5, {"a": 5, "b": 3, "c": 2})
    {'a': 3, 'b': 1, 'c': 1}
    """
    n = sum(counts.values())
    floor_one = m >= len(counts)
    quota = {c: m * k / n for c, k in counts.items()}
    out = {c: min(counts[c], max(int(floor_one), math.floor(q))) for c, q in quota.items()}
    while sum(out.values()) > m:  # the minimum of one took seats: give back from the largest
        big = max(sorted(out), key=lambda c: out[c])
        out[big] -= 1
    order = sorted(quota, key=lambda c: (-(quota[c] - math.floor(quota[c])), c))
    while sum(out.values()) < m:
        for c in order:
            if out[c] < counts[c] and sum(out.values()) < m:
                out[c] += 1
    return out


def _stratified(
    seed: int,
    node: str,
    members: Sequence[str],
    classes: Mapping[str, str],
    m: int,
    rnd: int,
    key: Sequence[object],
) -> list[str]:
    by_class: dict[str, list[str]] = {}
    for c in members:
        by_class.setdefault(classes[c], []).append(c)
    chosen: list[str] = []
    for cls, k in sorted(seats(m, {c: len(v) for c, v in by_class.items()}).items()):
        pool = by_class[cls]
        rng = np_rng(seed, "sample", rnd, *key, node, cls)
        chosen += [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    return sorted(chosen)


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
    classes: Mapping[str, str] | None = None,
) -> Draw:
    """Sampling, exclusion and dropouts of one node-round. Excluded members (``exclude``,
    unlearning) are drawn like everyone, so the others' sample and dropout draws stay as they
    were, and dropped before the broadcast: no bytes, no training, no wait, no weight.
    ``classes``: the members' resource classes (clients only), used under ``by_resource``."""
    by_class = classes if tier.sampling == "by_resource" else None
    full = sample(
        seed=seed,
        node=node,
        members=members,
        p=tier.participation,
        rnd=rnd,
        key=key,
        classes=by_class,
    )
    sampled = [c for c in full if c not in excluded]
    gone = dropouts(seed=seed, node=node, members=full, p=tier.dropout, rnd=rnd, key=key)
    return Draw(full, sampled, gone.difference(excluded))
