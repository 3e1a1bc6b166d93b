"""Exclusion: clients, or whole subtrees, taken out of a federation's training.

The config's top-level ``exclude`` lists client ids (``global/inst-02/student-007``) or tier-node
ids (``global/inst-02``: every client below it). An excluded member is still *drawn*: a node
samples over its full member list exactly as without the exclusion, so every other member's
sampling, dropout draws, keys and batches stay what they were; the excluded member is dropped
right after the draw (``hierfed.engine.sampling.draw``): it gets no broadcast, trains nothing, is not waited for and
carries no weight. A tier node all of whose clients are excluded is excluded with them, so
naming every student of an institution is the same as naming the institution.

That is the property exact unlearning replays on (``hierfed.unlearning.replay``): a run with
``exclude=[X]`` equals the original, bit for bit, in every round before X is first drawn.

Example::

    >>> below = {"i0": ["i0/s1"], "i0/s1": ["i0/s1"], "i1": ["i1/s1", "i1/s2"], "i1/s1": ["i1/s1"]}
    >>> sorted(excluded_members(frozenset({"i0/s1", "i1/s1"}), below))
    ['i0', 'i0/s1', 'i1/s1']
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from hierfed.config import RunConfig
from hierfed.data.federation import Federation
from hierfed.errors import ConfigError

__all__ = ["excluded_clients", "excluded_members", "removable_ids"]


def removable_ids(federation: Federation) -> dict[str, frozenset[str]]:
    """Every id ``exclude`` accepts, with the clients it removes: each client id, and each tier
    node below the root (a prefix of client paths, e.g. ``global/inst-02``)."""
    below: dict[str, set[str]] = defaultdict(set)
    for c in federation.clients:
        below[c.id].add(c.id)
        for i in range(1, len(c.path) - 1):
            below["/".join(c.path[: i + 1])].add(c.id)
    return {k: frozenset(v) for k, v in below.items()}


def excluded_clients(cfg: RunConfig, federation: Federation) -> frozenset[str]:
    """The clients ``cfg.exclude`` removes (empty when it lists none).

    Raises ConfigError, before any work starts, for an id that names no client or tier node, an
    id listed twice or covered by another listed id, and an exclusion that leaves no client.
    """
    ids = list(cfg.exclude)
    if not ids:
        return frozenset()
    known = removable_ids(federation)
    out: set[str] = set()
    listed: list[str] = []
    for x in ids:
        if not isinstance(x, str) or x not in known:
            first = federation.clients[0]
            node = "/".join(first.path[:2]) if len(first.path) > 2 else first.id
            raise ConfigError(
                "exclude",
                x,
                f"no client or tier node has this id; ids are tier paths such as '{first.id}' "
                f"(a client) or '{node}' (everything below a tier node)",
            )
        clash = next((y for y in listed if known[y] & known[x]), None)
        if clash is not None:
            raise ConfigError(
                "exclude",
                x,
                f"already removed by '{clash}' listed before it; name each client once",
            )
        listed.append(x)
        out |= known[x]
    if len(out) == len(federation.clients):
        raise ConfigError("exclude", ids, "removes every client; keep at least one in training")
    return frozenset(out)


def excluded_members(
    excluded: frozenset[str], leaves_below: Mapping[str, Iterable[str]]
) -> frozenset[str]:
    """Tree node ids a parent drops after sampling: the excluded clients and every node all of
    whose clients (``leaves_below``: node id -> its clients) are excluded."""
    if not excluded:
        return frozenset()
    return frozenset(n for n, leaves in leaves_below.items() if set(leaves) <= excluded)
