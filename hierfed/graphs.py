"""Communication graphs for peer mixing: builders, connectivity, link failures.

Graphs are undirected, simple (no self-loops, no duplicate edges) and must be connected.
Nodes are indices ``0..n-1``; callers map them to node ids (sorted, so the mapping is stable).
Every random graph is drawn from the generator the caller passes (keyed by seed and round).
The mixing matrices over these graphs are in ``hierfed.mixing``.

Example::

    >>> sorted(ring(4))
    [(0, 1), (0, 3), (1, 2), (2, 3)]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from hierfed.errors import ConfigError

Edge = tuple[int, int]  # (i, j) with i < j

GRAPHS = ("ring", "torus", "complete", "random_regular", "erdos_renyi", "small_world", "edges")


# ---------------------------------------------------------------- graph builders


def _edge(i: int, j: int) -> Edge:
    return (i, j) if i < j else (j, i)


def ring(n: int) -> frozenset[Edge]:
    """Each node linked to its two neighbours on a cycle (one edge for n = 2, none for n = 1)."""
    return frozenset(_edge(i, (i + 1) % n) for i in range(n) if (i + 1) % n != i)


def torus_shape(n: int) -> tuple[int, int]:
    """The most square ``rows x cols = n`` grid (rows <= cols); a prime n gives ``1 x n`` (a ring)."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def torus(n: int) -> frozenset[Edge]:
    """A 2-D torus: node ``r * cols + c`` links to its four grid neighbours, wrapping around."""
    rows, cols = torus_shape(n)
    out = set()
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            for j in (r * cols + (c + 1) % cols, ((r + 1) % rows) * cols + c):
                if j != i:
                    out.add(_edge(i, j))
    return frozenset(out)


def complete(n: int) -> frozenset[Edge]:
    return frozenset((i, j) for i in range(n) for j in range(i + 1, n))


def random_regular(
    n: int, degree: int, rng: np.random.Generator, *, tries: int = 200
) -> frozenset[Edge]:
    """A uniformly paired ``degree``-regular simple graph (configuration model with retries)."""
    if degree < 1 or degree >= n or (n * degree) % 2:
        raise ConfigError(
            "topology.options.degree",
            degree,
            f"a random regular graph on {n} nodes needs 1 <= degree < {n} and n * degree even",
        )
    for _ in range(tries):
        stubs = np.repeat(np.arange(n), degree)
        rng.shuffle(stubs)
        pairs = stubs.reshape(-1, 2)
        edges = {_edge(int(a), int(b)) for a, b in pairs}
        if len(edges) == len(pairs) and all(a != b for a, b in pairs):
            g = frozenset(edges)
            if is_connected(n, g):
                return g
    raise ConfigError(
        "topology.options.degree",
        degree,
        f"no connected {degree}-regular graph found on {n} nodes; raise the degree",
    )


def erdos_renyi(n: int, p: float, rng: np.random.Generator, *, tries: int = 200) -> frozenset[Edge]:
    """G(n, p), redrawn (same keyed stream) until connected."""
    if not (0 < p <= 1):
        raise ConfigError("topology.options.p", p, "edge probability must lie in (0, 1]")
    iu = np.triu_indices(n, k=1)
    for _ in range(tries):
        keep = rng.random(len(iu[0])) < p
        g = frozenset((int(a), int(b)) for a, b, k in zip(iu[0], iu[1], keep) if k)
        if is_connected(n, g):
            return g
    raise ConfigError(
        "topology.options.p", p, f"G({n}, {p}) was never connected in {tries} draws; raise p"
    )


def small_world(
    n: int, k: int, beta: float, rng: np.random.Generator, *, tries: int = 200
) -> frozenset[Edge]:
    """Watts–Strogatz: a ring lattice with ``k`` neighbours per node, each edge rewired with prob. ``beta``."""
    if k < 2 or k % 2 or k >= n:
        raise ConfigError(
            "topology.options.k", k, f"small-world needs an even k with 2 <= k < n={n}"
        )
    if not (0 <= beta <= 1):
        raise ConfigError("topology.options.beta", beta, "rewiring probability must lie in [0, 1]")
    for _ in range(tries):
        edges = {_edge(i, (i + s) % n) for i in range(n) for s in range(1, k // 2 + 1)}
        for i in range(n):
            for s in range(1, k // 2 + 1):
                e = _edge(i, (i + s) % n)
                if e in edges and rng.random() < beta:
                    free = [j for j in range(n) if j != i and _edge(i, j) not in edges]
                    if free:
                        edges.discard(e)
                        edges.add(_edge(i, int(free[rng.integers(len(free))])))
        g = frozenset(edges)
        if is_connected(n, g):
            return g
    raise ConfigError(
        "topology.options.beta",
        beta,
        "the rewired graph was never connected; lower beta or raise k",
    )


def from_edge_list(
    nodes: Sequence[str], pairs: Iterable[Sequence[str]], *, key: str = "topology.options.edges"
) -> frozenset[Edge]:
    """A user graph over node ids: ``[[a, b], ...]``; unknown ids and self-loops are rejected."""
    index = {nid: i for i, nid in enumerate(nodes)}
    out = set()
    for pair in pairs:
        if len(pair) != 2:
            raise ConfigError(key, list(pair), "each edge is a pair of node ids [a, b]")
        a, b = str(pair[0]), str(pair[1])
        for x in (a, b):
            if x not in index:
                near = [n for n in nodes if n.endswith(x)][:3]
                raise ConfigError(
                    key,
                    [a, b],
                    f"'{x}' is not a node of this graph; node ids look like {near or list(nodes[:2])}",
                )
        if a == b:
            raise ConfigError(
                key,
                [a, b],
                "self-loops are not allowed: a node always keeps its own value (the diagonal)",
            )
        out.add(_edge(index[a], index[b]))
    return frozenset(out)


def is_connected(n: int, edges: Iterable[Edge]) -> bool:
    if n <= 1:
        return True
    adj: list[list[int]] = [[] for _ in range(n)]
    for i, j in edges:
        adj[i].append(j)
        adj[j].append(i)
    seen = {0}
    todo = deque([0])
    while todo:
        for j in adj[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def require_connected(nodes: Sequence[str], edges: Iterable[Edge], *, key: str) -> None:
    """Raise ConfigError naming an unreachable node if the graph is not connected."""
    edges = list(edges)
    if is_connected(len(nodes), edges):
        return
    adj: dict[int, set[int]] = {i: set() for i in range(len(nodes))}
    for i, j in edges:
        adj[i].add(j)
        adj[j].add(i)
    seen, todo = {0}, deque([0])
    while todo:
        for j in adj[todo.popleft()]:
            if j not in seen:
                seen.add(j)
                todo.append(j)
    lost = [nodes[i] for i in range(len(nodes)) if i not in seen]
    raise ConfigError(
        key,
        None,
        f"the graph is disconnected: {len(lost)} of {len(nodes)} nodes (e.g. '{lost[0]}') cannot reach "
        f"'{nodes[0]}', so gossip would never reach consensus; add edges or pick a connected graph",
    )


@dataclass(frozen=True)
class GraphSpec:
    """Which graph to build; parsed from ``topology.options`` by the caller."""

    kind: str = "ring"
    degree: int = 3  # random_regular
    p: float = 0.3  # erdos_renyi
    k: int = 4  # small_world: lattice neighbours (even)
    beta: float = 0.2  # small_world: rewiring probability
    edges: tuple[tuple[str, str], ...] = ()  # kind == "edges": user edge list over node ids

    def __post_init__(self) -> None:
        if self.kind not in GRAPHS:
            raise ConfigError(
                "topology.options.graph", self.kind, f"known graphs: {', '.join(GRAPHS)}"
            )


def build_graph(spec: GraphSpec, nodes: Sequence[str], rng: np.random.Generator) -> frozenset[Edge]:
    """The edges of ``spec`` over ``nodes`` (sorted ids); connected, or ConfigError."""
    n = len(nodes)
    if spec.kind == "ring":
        g = ring(n)
    elif spec.kind == "torus":
        g = torus(n)
    elif spec.kind == "complete":
        g = complete(n)
    elif spec.kind == "random_regular":
        g = random_regular(n, spec.degree, rng)
    elif spec.kind == "erdos_renyi":
        g = erdos_renyi(n, spec.p, rng)
    elif spec.kind == "small_world":
        g = small_world(n, spec.k, spec.beta, rng)
    else:
        g = from_edge_list(nodes, spec.edges)
    require_connected(
        nodes, g, key=f"topology.options.{'edges' if spec.kind == 'edges' else 'graph'}"
    )
    return g


def drop_links(edges: Iterable[Edge], p: float, rng: np.random.Generator) -> frozenset[Edge]:
    """Each link independently fails with probability ``p`` (one draw per edge, in sorted order)."""
    ordered = sorted(edges)
    if p <= 0:
        return frozenset(ordered)
    alive = rng.random(len(ordered)) >= p
    return frozenset(e for e, a in zip(ordered, alive) if a)
