"""LoRA aggregation: exact product-space merge vs the naive per-factor mean, on hand numbers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed.aggregators.base import AggContext
from hierfed.aggregators.lora import (
    LoraExact,
    LoraNaive,
    lora_pairs,
    lowrank_svd,
    mask_rank,
    refactor,
    truncate_rank,
)
from hierfed.errors import ConfigError, HierfedError
from hierfed.registry import AGGREGATORS
from hierfed.update import Update

C = "adapter.x"
KA, KB = "l.lora_A.weight", "l.lora_B.weight"


def _updates(base, clients, weights=None):
    """Updates whose absolute factors are ``clients[i] = (A_i, B_i)`` against ``base``."""
    weights = weights or [1.0] * len(clients)
    out = []
    for i, ((a, b), w) in enumerate(zip(clients, weights)):
        delta = {C: {KA: a - base[C][KA], KB: b - base[C][KB]}}
        out.append(Update.from_delta(delta, w, sender=f"c{i}", round=1))
    return out


def _merged(agg, base, clients, weights=None):
    ups = _updates(base, clients, weights)
    merged, _ = agg.aggregate(ups, None, AggContext("n", "global", 1, 0, state=base))
    m = merged.mean()[C]
    return base[C][KA] + m[KA], base[C][KB] + m[KB], merged


def _base(rank=1, out=2, inp=2):
    return {C: {KA: torch.zeros(rank, inp), KB: torch.zeros(out, rank)}}


# two rank-1 clients: B1 A1 = [[1,1],[0,0]], B2 A2 = [[0,2],[0,0]]; their mean [[.5,1.5],[0,0]] has rank 1
HAND = [
    (torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0], [0.0]])),
    (torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0], [0.0]])),
]


def test_exact_merge_equals_mean_of_products_by_hand():
    a, b, _ = _merged(LoraExact({}), _base(), HAND)
    assert torch.allclose(b @ a, torch.tensor([[0.5, 1.5], [0.0, 0.0]]), atol=1e-6)


def test_naive_merge_differs_from_mean_of_products_by_hand():
    a, b, _ = _merged(LoraNaive({}), _base(), HAND)
    # mean B = [1.5, 0]^T, mean A = [.5, 1]  ->  [[.75, 1.5], [0, 0]]
    assert torch.allclose(a, torch.tensor([[0.5, 1.0]]))
    assert torch.allclose(b @ a, torch.tensor([[0.75, 1.5], [0.0, 0.0]]))
    assert not torch.allclose(b @ a, torch.tensor([[0.5, 1.5], [0.0, 0.0]]), atol=1e-3)


def test_exact_merge_weights_products_by_component_weight():
    # weights 1 and 3: (1*[[1,1],[0,0]] + 3*[[0,2],[0,0]]) / 4 = [[.25, 1.75], [0, 0]]
    a, b, merged = _merged(LoraExact({}), _base(), HAND, weights=[1.0, 3.0])
    assert torch.allclose(b @ a, torch.tensor([[0.25, 1.75], [0.0, 0.0]]), atol=1e-6)
    assert merged.weights[C] == 4.0


def test_exact_merge_uses_the_node_state_as_the_clients_start():
    # the same absolute factors sent as deltas against a non-zero node state give the same merge
    base = {C: {KA: torch.tensor([[3.0, -1.0]]), KB: torch.tensor([[0.5], [2.0]])}}
    a, b, _ = _merged(LoraExact({}), base, HAND)
    assert torch.allclose(b @ a, torch.tensor([[0.5, 1.5], [0.0, 0.0]]), atol=1e-6)


def test_exact_merge_truncates_to_the_best_rank_r_approximation():
    # mean of diag(2, 0) and diag(0, 1) is diag(1, .5): rank 2; at rank 1 the best is diag(1, 0)
    clients = [
        (torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0], [0.0]])),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])),
    ]
    a, b, _ = _merged(LoraExact({}), _base(), clients)
    assert torch.allclose(b @ a, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    a2, b2, _ = _merged(
        LoraExact({}),
        _base(rank=2),
        [
            (torch.cat([x, torch.zeros(1, 2)]), torch.cat([y, torch.zeros(2, 1)], dim=1))
            for x, y in clients
        ],
    )
    assert torch.allclose(
        b2 @ a2, torch.tensor([[1.0, 0.0], [0.0, 0.5]]), atol=1e-6
    )  # rank 2: exact


def test_exact_merge_puts_singular_values_in_b_and_keeps_a_orthonormal():
    a, b, _ = _merged(
        LoraExact({}),
        _base(rank=2),
        [
            (torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])),
            (torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]])),
        ],
    )
    # mean product [[.5,.5],[0,0]] has rank 1; the second slot keeps an orthonormal A row (trainable)
    assert torch.allclose(a @ a.T, torch.eye(2), atol=1e-6)
    assert torch.allclose(b @ a, torch.tensor([[0.5, 0.5], [0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(b[:, 1], torch.zeros(2), atol=1e-6)


def test_heterogeneous_ranks_merge_exactly_in_product_space():
    # skeleton rank 2; client 0 has rank 1 (slot 1 zero-padded), client 1 rank 2
    base = _base(rank=2, out=3, inp=3)
    a0 = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    b0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    a1 = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    b1 = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    want = (b0 @ a0 + b1 @ a1) / 2  # rank 2: spanned by rows [1,0,1] and [0,1,0]
    a, b, _ = _merged(LoraExact({}), base, [(a0, b0), (a1, b1)])
    assert torch.allclose(b @ a, want, atol=1e-6)
    an, bn, _ = _merged(LoraNaive({}), base, [(a0, b0), (a1, b1)])
    assert not torch.allclose(bn @ an, want, atol=1e-3)


def test_non_lora_parameters_and_components_get_the_weighted_mean():
    base = {
        C: {KA: torch.zeros(1, 2), KB: torch.zeros(2, 1), "bias": torch.zeros(2)},
        "head.t": {"w": torch.zeros(1)},
    }
    ups = [
        Update.from_delta(
            {
                C: {KA: a, KB: b, "bias": torch.full((2,), float(i))},
                "head.t": {"w": torch.tensor([2.0 * i])},
            },
            1.0,
            sender=f"c{i}",
            round=0,
        )
        for i, (a, b) in enumerate(HAND)
    ]
    merged, _ = LoraExact({}).aggregate(ups, None, AggContext("n", "global", 0, 0, state=base))
    m = merged.mean()
    assert torch.allclose(m[C]["bias"], torch.full((2,), 0.5))
    assert torch.allclose(m["head.t"]["w"], torch.tensor([1.0]))


def test_exact_merge_without_node_state_is_an_error():
    with pytest.raises(HierfedError, match="AggContext.state"):
        LoraExact({}).aggregate(_updates(_base(), HAND), None, AggContext("n", "global", 0, 0))


def test_exact_merge_rejects_a_bad_components_option():
    with pytest.raises(ConfigError):
        AGGREGATORS.get("lora_exact").check_options({"components": ""})
    with pytest.raises(ConfigError):
        AGGREGATORS.get("lora_exact").check_options({"rank": 3})


def test_truncate_rank_is_the_best_low_rank_view_and_zero_pads():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # B A = diag(3, 1)
    out = truncate_rank({KA: a, KB: b, "other": torch.ones(1)}, 1)
    assert torch.allclose(out[KB] @ out[KA], torch.tensor([[3.0, 0.0], [0.0, 0.0]]), atol=1e-6)
    assert torch.count_nonzero(out[KA][1]) == 0 and torch.count_nonzero(out[KB][:, 1]) == 0
    assert out["other"] is not None and torch.equal(out["other"], torch.ones(1))
    same = truncate_rank({KA: a, KB: b}, 2)
    assert torch.equal(same[KA], a) and torch.equal(same[KB], b)


def test_mask_rank_zeroes_only_the_unused_slots():
    a, b = torch.ones(3, 2), torch.ones(2, 3)
    out = mask_rank({KA: a, KB: b}, 2)
    assert out[KA].sum() == 4 and out[KB].sum() == 4
    assert a.sum() == 6  # input not mutated


def test_lora_pairs_follow_peft_names():
    params = {
        "x.q.lora_A.weight": torch.zeros(1),
        "x.q.lora_B.weight": torch.zeros(1),
        "x.v.lora_A.weight": torch.zeros(1),
    }
    assert lora_pairs(params) == [("x.q.lora_A.weight", "x.q.lora_B.weight")]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(0, 10_000))
def test_lowrank_svd_reconstructs_the_weighted_sum(n, r, seed):
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(6, r, generator=g) for _ in range(n)]
    as_ = [torch.randn(r, 5, generator=g) for _ in range(n)]
    coefs = [float(c) for c in torch.rand(n, generator=g) + 0.1]
    dense = sum(c * b.double() @ a.double() for b, a, c in zip(bs, as_, coefs))
    u, s, vh = lowrank_svd(bs, as_, coefs)
    k = s.shape[0]
    assert torch.allclose(u[:, :k] * s @ vh[:k], dense, atol=1e-8)
    full_b, full_a = refactor(u, s, vh, rank=min(6, 5))
    assert torch.allclose(full_b @ full_a, dense, atol=1e-8)  # rank 5 >= rank of the sum
