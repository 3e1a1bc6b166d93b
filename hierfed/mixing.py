"""Gossip mixing: doubly-stochastic mixing matrices, push-sum plans, and the mixing step.

Used by the ``gossip`` topology (no server) and by the tree's semi-decentralized option
(members of one tier gossip between aggregations by their parent). Graph and matrix math is
numpy on ``n x n`` matrices and runs wherever it is called; the tensor part
(``combine`` / ``consensus``) runs on the workers.

The graphs themselves (builders, connectivity, link failures) are in ``hierfed.graphs``; their
names are re-exported here for callers that mix.

Mixing with a symmetric doubly-stochastic ``W`` (rows and columns sum to 1)::

    x_i <- sum_j W_ij x_j                       (uniform weighting)

preserves the plain mean of the ``x_i``. With *sample weighting* every node also carries a
weight ``w_i`` (its training rows) and both ``y_i = w_i x_i`` and ``w_i`` are mixed linearly
(the push-sum ratio form)::

    x_i <- (sum_j W_ij w_j x_j) / (sum_j W_ij w_j)

which preserves ``sum_i y_i`` and ``sum_i w_i`` when the mixed weights ``w_i' = sum_j W_ij w_j``
are carried on to the next step (``push_sum_plan``, used by both semi-decentralized options
in hierfed/engine/peers.py: inner-tier peer mixing and the leaf tier's device-to-device gossip). The
``gossip`` topology keeps each node's weight fixed at ``w_i``, which preserves the
``w``-weighted mean exactly only where all mixed values end up equal, e.g. after one step on
the complete graph. On the complete
graph with Metropolis–Hastings weights ``W = 11^T / n``, so one step gives every node exactly
FedAvg's sample-weighted mean.

Components that only some nodes hold are mixed among their holders, on the subgraph of
links whose two ends share the component (``induced``), with the weights recomputed from the
degrees in that subgraph — so on the complete graph every holder averages over exactly the
holders, as FedAvg does. Dropped nodes and failed links are removed before the weights are
computed, the same way. (``restrict`` is the alternative that keeps ``W`` and folds the
removed mass onto the diagonal; both stay symmetric and doubly stochastic.)

Example::

    >>> import numpy as np
    >>> W = metropolis_hastings(3, ring(3))
    >>> bool(np.allclose(W, 1 / 3))
    True
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch

from hierfed.errors import ConfigError
from hierfed.graphs import (
    GRAPHS,
    Edge,
    GraphSpec,
    build_graph,
    complete,
    drop_links,
    erdos_renyi,
    from_edge_list,
    is_connected,
    random_regular,
    require_connected,
    ring,
    small_world,
    torus,
    torus_shape,
)

__all__ = [
    "GRAPHS",
    "RULES",
    "Edge",
    "GraphSpec",
    "build_graph",
    "coefficients",
    "combine",
    "complete",
    "compose",
    "consensus_distance",
    "degrees",
    "drop_links",
    "erdos_renyi",
    "from_edge_list",
    "induced",
    "is_connected",
    "max_degree",
    "metropolis_hastings",
    "mix_states",
    "mixing_matrix",
    "push_sum_plan",
    "random_regular",
    "require_connected",
    "restrict",
    "ring",
    "small_world",
    "torus",
    "torus_shape",
    "weighted_average",
]

RULES = ("metropolis_hastings", "max_degree")


# ---------------------------------------------------------------- matrices


def degrees(n: int, edges: Iterable[Edge]) -> np.ndarray:
    d = np.zeros(n, dtype=np.int64)
    for i, j in edges:
        d[i] += 1
        d[j] += 1
    return d


def metropolis_hastings(n: int, edges: Iterable[Edge]) -> np.ndarray:
    """``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum_j W_ij``: symmetric, doubly stochastic."""
    edges = list(edges)
    d = degrees(n, edges)
    W = np.zeros((n, n))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1 + max(d[i], d[j]))
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def max_degree(n: int, edges: Iterable[Edge]) -> np.ndarray:
    """``W_ij = 1 / (1 + d_max)`` on edges, the rest on the diagonal."""
    edges = list(edges)
    dmax = int(degrees(n, edges).max()) if n else 0
    W = np.zeros((n, n))
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1 + dmax)
    W[np.diag_indices(n)] = 1.0 - W.sum(axis=1)
    return W


def mixing_matrix(n: int, edges: Iterable[Edge], rule: str = "metropolis_hastings") -> np.ndarray:
    if rule == "metropolis_hastings":
        return metropolis_hastings(n, edges)
    if rule == "max_degree":
        return max_degree(n, edges)
    raise ConfigError("topology.options.weights", rule, f"known mixing rules: {', '.join(RULES)}")


def restrict(W: np.ndarray, labels: Sequence[Hashable | None]) -> np.ndarray:
    """Keep ``W_ij`` only where ``labels[i] == labels[j] is not None``; fold the rest onto the diagonal.

    Rows of unlabeled nodes become identity rows (they neither send nor receive). The result
    stays symmetric and doubly stochastic when ``W`` is.
    """
    lab = list(labels)
    n = len(lab)
    same = np.array(
        [[lab[i] is not None and lab[i] == lab[j] for j in range(n)] for i in range(n)], dtype=bool
    )
    R = np.where(same, W, 0.0)
    R[np.diag_indices(n)] = 0.0
    R[np.diag_indices(n)] = 1.0 - R.sum(axis=1)
    return R


def induced(edges: Iterable[Edge], labels: Sequence[Hashable | None]) -> frozenset[Edge]:
    """The links whose two ends carry the same, non-None label (e.g. both hold a component)."""
    return frozenset((i, j) for i, j in edges if labels[i] is not None and labels[i] == labels[j])


def compose(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """The effect of mixing with ``matrices[0]``, then ``[1]``, ...: ``M = W_k ... W_1``."""
    M = np.eye(matrices[0].shape[0])
    for W in matrices:
        M = W @ M
    return M


def coefficients(M: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Row-stochastic ``A_ij = M_ij w_j / sum_k M_ik w_k``: ``x' = A x`` is the ratio form above.

    A row whose denominator is 0 (no weight reaches the node) keeps the node's own value.
    """
    w = np.asarray(weights, dtype=np.float64)
    num = M * w[None, :]
    den = num.sum(axis=1, keepdims=True)
    A = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    empty = den[:, 0] <= 0
    A[empty, :] = 0.0
    A[empty, np.flatnonzero(empty)] = 1.0
    return A


MixRows = dict[str, list[tuple[tuple[str, ...], tuple[tuple[str, float], ...]]]]


def push_sum_plan(
    nodes: Sequence[str],
    edges: Iterable[Edge],
    carried: Mapping[str, Mapping[str, float]],
    steps: int,
    rule: str = "metropolis_hastings",
) -> tuple[MixRows, dict[str, dict[str, float]]]:
    """Push-sum mixing with *carried* weights: the rows for ``MixTask.groups`` and the new weights.

    ``carried[node][c] > 0`` is the node's current weight for component ``c`` (absent: the
    node does not hold ``c``; it neither sends nor receives it). Per component, holders mix on
    the subgraph of ``edges`` whose two ends both hold it (``induced``), ``steps`` times with
    the doubly-stochastic matrix of ``rule``; ``M`` is the composed matrix. Then
    ``x_i' = (M y)_i / (M w)_i`` with ``y = w x`` (``coefficients``) and the node's new weight
    is ``w_i' = (M w)_i``. Because ``M``'s columns sum to 1, ``sum_i w_i' x_i' = sum_i w_i x_i``
    and ``sum_i w_i' = sum_i w_i``: a parent that takes the ``w``-weighted mean of its members
    computes the same thing before and after the mixing, on any graph.

    Returns ``(rows, weights)``: ``rows[node]`` lists ``(components, ((source, coef), ...))``
    with sources sorted like ``nodes``, one entry per group of components held alike; a
    holder without live links gets its identity row (it keeps its own value). Nodes holding
    nothing get no entry. Pure numpy; the tensors are combined on the workers.
    """
    edges = frozenset(edges)
    comps = sorted({c for held in carried.values() for c in held})
    alike: dict[tuple[float, ...], list[str]] = {}
    for c in comps:
        ws = tuple(float(carried.get(x, {}).get(c, 0.0)) for x in nodes)
        alike.setdefault(ws, []).append(c)
    rows: MixRows = {}
    weights: dict[str, dict[str, float]] = {}
    for ws, cs in sorted(alike.items(), key=lambda kv: kv[1]):
        labels = [True if w > 0 else None for w in ws]
        W = mixing_matrix(len(nodes), induced(edges, labels), rule)
        M = compose([W] * steps) if steps > 0 else np.eye(len(nodes))
        A = coefficients(M, ws)
        new_w = M @ np.asarray(ws, dtype=np.float64)
        for i, x in enumerate(nodes):
            if labels[i] is None:
                continue
            row = tuple((nodes[j], float(A[i, j])) for j in np.flatnonzero(A[i]).tolist())
            rows.setdefault(x, []).append((tuple(cs), row))
            weights.setdefault(x, {}).update({c: float(new_w[i]) for c in cs})
    return rows, weights


# ---------------------------------------------------------------- tensor math (workers)


def combine(terms: Sequence[tuple[float, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``sum_j a_j x_j`` over the parameters of one component, accumulated in float64 in the
    given order (callers pass sources sorted by node id) and cast back to the inputs' dtype."""
    first = terms[0][1]
    out: dict[str, torch.Tensor] = {}
    for p, t0 in first.items():
        acc = torch.zeros(t0.shape, dtype=torch.float64)
        for a, params in terms:
            if a != 0.0:
                acc += float(a) * params[p].detach().to(torch.float64)
        out[p] = acc.to(t0.dtype)
    return out


def mix_states(
    A: np.ndarray,
    nodes: Sequence[str],
    values: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    components: Sequence[str],
    rows: Sequence[str] | None = None,
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """New values of ``components`` for ``rows`` (default all nodes): ``x_i[c] = sum_j A_ij x_j[c]``.

    ``values[node][component]`` must exist wherever ``A_ij != 0``. Pure: inputs are not mutated.
    """
    index = {nid: i for i, nid in enumerate(nodes)}
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for nid in rows if rows is not None else nodes:
        i = index[nid]
        out[nid] = {}
        for c in components:
            terms = [
                (float(A[i, j]), values[nodes[j]][c]) for j in range(len(nodes)) if A[i, j] != 0.0
            ]
            if terms:
                out[nid][c] = combine(terms)
    return out


def consensus_distance(
    values: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    groups: Mapping[str, Mapping[str, Hashable]],
) -> float:
    """Mean over nodes of ``||x_i - xbar||``, where for every component ``xbar`` is the plain mean
    over the nodes that share it with ``i`` (same label in ``groups[component]``).

    ``groups[c][node]`` is the node's label for component ``c`` (absent: the node does not share c).
    A node that shares nothing with anyone counts as distance 0.
    """
    sq: dict[str, float] = {nid: 0.0 for nid in values}
    for c, labels in sorted(groups.items()):
        classes: dict[Hashable, list[str]] = {}
        for nid, lab in sorted(labels.items(), key=lambda kv: kv[0]):
            classes.setdefault(lab, []).append(nid)
        for members in classes.values():
            if len(members) < 2:
                continue
            for p in sorted(values[members[0]][c]):
                stack = torch.stack([values[m][c][p].detach().to(torch.float64) for m in members])
                dev = (
                    (stack - stack.mean(dim=0, keepdim=True))
                    .reshape(len(members), -1)
                    .pow(2)
                    .sum(dim=1)
                )
                for m, d in zip(members, dev.tolist()):
                    sq[m] += d
    return float(np.mean([math.sqrt(v) for v in sq.values()])) if sq else 0.0


def weighted_average(
    values: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]],
    weights: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, torch.Tensor]]:
    """Per component ``c``: ``sum_i w_i x_i[c] / sum_i w_i`` over the nodes listed in ``weights[c]``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for c, ws in sorted(weights.items()):
        total = sum(ws.values())
        if total > 0:
            out[c] = combine([(w / total, values[nid][c]) for nid, w in sorted(ws.items())])
    return out
