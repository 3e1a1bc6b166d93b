"""Graphs and mixing matrices (hierfed/mixing.py): hand-computed cases and laws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed import mixing
from hierfed.errors import ConfigError
from hierfed.seeding import np_rng


def _rng(*k):
    return np_rng(0, "test", *k)


def test_ring_torus_complete_shapes():
    assert mixing.ring(4) == {(0, 1), (1, 2), (2, 3), (0, 3)}
    assert mixing.torus_shape(12) == (3, 4)
    t = mixing.torus(12)
    assert set(mixing.degrees(12, t).tolist()) == {4}
    assert len(mixing.complete(5)) == 10


@pytest.mark.parametrize("kind", mixing.GRAPHS[:-1])
def test_every_builder_gives_a_connected_simple_graph(kind):
    nodes = [f"n{i:02d}" for i in range(12)]
    g = mixing.build_graph(
        mixing.GraphSpec(kind=kind, degree=3, p=0.4, k=4, beta=0.3), nodes, _rng(kind)
    )
    assert all(i < j for i, j in g)
    assert mixing.is_connected(12, g)
    if kind == "random_regular":
        assert set(mixing.degrees(12, g).tolist()) == {3}


def test_random_graphs_are_keyed():
    a = mixing.erdos_renyi(10, 0.3, _rng("x"))
    b = mixing.erdos_renyi(10, 0.3, _rng("x"))
    c = mixing.erdos_renyi(10, 0.3, _rng("y"))
    assert a == b and a != c


def test_metropolis_hastings_by_hand():
    # path 0-1-2: degrees 1,2,1 -> W01 = W12 = 1/3; diag 2/3, 1/3, 2/3
    W = mixing.metropolis_hastings(3, {(0, 1), (1, 2)})
    expect = np.array([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(W, expect)
    # complete graph: every entry 1/n
    np.testing.assert_allclose(
        mixing.metropolis_hastings(4, mixing.complete(4)), np.full((4, 4), 0.25)
    )


def test_disconnected_graph_rejected():
    nodes = ["a", "b", "c", "d"]
    with pytest.raises(ConfigError, match="disconnected.*'c'"):
        mixing.build_graph(
            mixing.GraphSpec(kind="edges", edges=(("a", "b"), ("c", "d"))), nodes, _rng()
        )


def test_self_loop_rejected():
    with pytest.raises(ConfigError, match="self-loops"):
        mixing.from_edge_list(["a", "b"], [("a", "b"), ("b", "b")])


def test_unknown_node_in_edge_list_rejected():
    with pytest.raises(ConfigError, match="'zed' is not a node"):
        mixing.from_edge_list(["a", "b"], [("a", "zed")])


def test_unknown_graph_rejected():
    with pytest.raises(ConfigError, match="known graphs"):
        mixing.GraphSpec(kind="hypercube")


def test_restrict_folds_mass_onto_diagonal():
    W = mixing.metropolis_hastings(3, mixing.complete(3))
    R = mixing.restrict(W, ["x", None, "x"])
    np.testing.assert_allclose(R, [[2 / 3, 0, 1 / 3], [0, 1, 0], [1 / 3, 0, 2 / 3]])


def test_coefficients_ratio_form_by_hand():
    M = np.full((2, 2), 0.5)
    A = mixing.coefficients(M, [1.0, 3.0])
    np.testing.assert_allclose(A, [[0.25, 0.75], [0.25, 0.75]])


def _connected_graph(draw, n):
    # a random spanning tree plus random extra edges: connected by construction
    edges = set()
    for i in range(1, n):
        edges.add((draw(st.integers(0, i - 1)), i))
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2 * n))
    for a, b in extra:
        if a != b:
            edges.add((min(a, b), max(a, b)))
    return frozenset(edges)


@st.composite
def graphs_and_values(draw):
    n = draw(st.integers(2, 9))
    g = _connected_graph(draw, n)
    vals = draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=n, max_size=n))
    ws = draw(st.lists(st.floats(0.5, 50), min_size=n, max_size=n))
    steps = draw(st.integers(1, 3))
    rule = draw(st.sampled_from(mixing.RULES))
    return n, g, vals, ws, steps, rule


@settings(max_examples=60, deadline=None)
@given(graphs_and_values())
def test_mixing_preserves_the_mean_on_connected_graphs(case):
    n, g, vals, ws, steps, rule = case
    W = mixing.mixing_matrix(n, g, rule)
    assert np.all(W >= -1e-12)
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    M = mixing.compose([W] * steps)
    nodes = [f"n{i}" for i in range(n)]
    values = {
        nid: {"c": {"w": torch.tensor([v], dtype=torch.float64)}} for nid, v in zip(nodes, vals)
    }
    # uniform weighting: the plain mean is preserved
    out = mixing.mix_states(mixing.coefficients(M, [1.0] * n), nodes, values, ["c"])
    new = [float(out[nid]["c"]["w"]) for nid in nodes]
    assert sum(new) / n == pytest.approx(sum(vals) / n, abs=1e-9 * (1 + max(map(abs, vals))))
    # sample weighting: the mixed weights w' = M w and the pre-weighted sum are preserved
    w2 = M @ np.asarray(ws)
    assert w2.sum() == pytest.approx(sum(ws))
    out = mixing.mix_states(mixing.coefficients(M, ws), nodes, values, ["c"])
    y2 = sum(w2[i] * float(out[nid]["c"]["w"]) for i, nid in enumerate(nodes))
    assert y2 == pytest.approx(sum(w * v for w, v in zip(ws, vals)), rel=1e-9, abs=1e-7)


@settings(max_examples=30, deadline=None)
@given(graphs_and_values(), st.lists(st.sampled_from(["a", "b", None]), min_size=9, max_size=9))
def test_restricted_mixing_preserves_each_holder_class_mean(case, labels):
    n, g, vals, _, _, rule = case
    labels = labels[:n]
    R = mixing.restrict(mixing.mixing_matrix(n, g, rule), labels)
    np.testing.assert_allclose(R, R.T)
    np.testing.assert_allclose(R.sum(axis=1), 1.0, atol=1e-12)
    x = np.asarray(vals)
    y = R @ x
    for lab in ("a", "b"):
        idx = [i for i, lab2 in enumerate(labels) if lab2 == lab]
        if idx:
            assert y[idx].sum() == pytest.approx(x[idx].sum(), abs=1e-9 * (1 + np.abs(x).sum()))
    for i, lab in enumerate(labels):
        if lab is None:
            assert y[i] == x[i]


def test_consensus_distance_by_hand():
    vals = {
        "a": {"c": {"w": torch.tensor([0.0, 0.0])}},
        "b": {"c": {"w": torch.tensor([3.0, 4.0])}},
        "z": {"c": {"w": torch.tensor([9.0, 9.0])}},
    }
    # a, b share c: mean (1.5, 2), each at distance 2.5; z shares nothing -> 0
    d = mixing.consensus_distance(vals, {"c": {"a": 0, "b": 0}})
    assert d == pytest.approx((2.5 + 2.5 + 0.0) / 3)


def test_induced_subgraph_on_the_complete_graph_averages_over_holders():
    # holders 0, 2, 3 of 4 nodes: MH on the induced K3 gives 1/3 among them; node 1 keeps its value
    g = mixing.induced(mixing.complete(4), ["h", None, "h", "h"])
    assert g == {(0, 2), (0, 3), (2, 3)}
    W = mixing.metropolis_hastings(4, g)
    np.testing.assert_allclose(W[np.ix_([0, 2, 3], [0, 2, 3])], np.full((3, 3), 1 / 3))
    assert W[1, 1] == 1.0
