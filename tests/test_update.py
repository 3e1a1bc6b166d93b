"""Update arithmetic: hand-computed sums and means, and the laws hierarchy relies on."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hierfed.update import Update, UpdateMeta, flat_state, state_norm, unflat_state


def _u(sender: str, comps: dict[str, list[float]], w: float | dict[str, float]) -> Update:
    delta = {c: {"w": torch.tensor(v, dtype=torch.float64)} for c, v in comps.items()}
    return Update.from_delta(
        delta, w, sender=sender, round=1, num_samples=int(w if isinstance(w, (int, float)) else 1)
    )


def test_weighted_mean_by_hand_three_clients():
    # clients hold different subsets: c only has the head, so the encoder's weight counts a and b only
    a = _u("a", {"enc": [1.0, 2.0], "head": [3.0]}, 1.0)
    b = _u("b", {"enc": [4.0, 8.0], "head": [0.0]}, 2.0)
    c = _u("c", {"head": [6.0]}, 3.0)
    total = Update.sum([c, a, b])
    assert total is not None
    mean = total.mean()
    assert total.weights == {"enc": 3.0, "head": 6.0}
    assert torch.allclose(
        mean["enc"]["w"], torch.tensor([(1 + 8) / 3, (2 + 16) / 3], dtype=torch.float64)
    )
    assert torch.allclose(mean["head"]["w"], torch.tensor([(3 + 0 + 18) / 6], dtype=torch.float64))
    assert total.meta.senders == ("a", "b", "c")
    assert total.meta.num_samples == 6


def test_add_does_not_mutate_inputs():
    a = _u("a", {"h": [1.0]}, 1.0)
    b = _u("b", {"h": [2.0]}, 1.0)
    before = a.tensors["h"]["w"].clone()
    _ = a + b
    assert torch.equal(a.tensors["h"]["w"], before)
    assert a.weights == {"h": 1.0}


def test_sum_of_nothing_is_none():
    assert Update.sum([]) is None


def test_flat_roundtrip_and_norm():
    s = {
        "head.t": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)},
        "enc.x": {"w": torch.full((3,), 2.0)},
    }
    back = unflat_state(flat_state(s))
    assert set(back) == set(s)
    assert all(torch.equal(back[c][p], s[c][p]) for c in s for p in s[c])
    assert abs(state_norm(s) - (4 + 12) ** 0.5) < 1e-9


weights = st.floats(min_value=0.1, max_value=100.0, allow_nan=False)
values = st.lists(st.floats(min_value=-10, max_value=10, allow_nan=False), min_size=3, max_size=3)
client = st.tuples(weights, values, st.booleans())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(client, min_size=2, max_size=12), st.integers(min_value=1, max_value=4), st.randoms()
)
def test_hierarchical_mean_equals_flat_mean_and_order_does_not_matter(clients, groups, rnd):
    ups = []
    for i, (w, v, has_enc) in enumerate(clients):
        comps = {"head": v}
        if has_enc or i == 0:
            comps["enc"] = [x * 2 for x in v]
        ups.append(_u(f"s{i:02d}", comps, w))
    flat = Update.sum(ups)
    # hierarchical: group clients, sum within groups, then sum the group totals (any grouping)
    buckets: dict[int, list[Update]] = {}
    for i, u in enumerate(ups):
        buckets.setdefault(i % groups, []).append(u)
    partial = [Update.sum(b) for b in buckets.values()]
    hier = Update.sum([p for p in partial if p is not None])
    shuffled = list(ups)
    rnd.shuffle(shuffled)
    again = Update.sum(shuffled)
    assert flat is not None and hier is not None and again is not None
    for c in flat.tensors:
        assert abs(flat.weights[c] - hier.weights[c]) < 1e-9
        assert torch.allclose(flat.mean()[c]["w"], hier.mean()[c]["w"], atol=1e-9)
        # Update.sum sorts by sender: a shuffled arrival order gives the identical bits
        assert torch.equal(flat.tensors[c]["w"], again.tensors[c]["w"])


@settings(max_examples=40, deadline=None)
@given(st.lists(client, min_size=1, max_size=12), st.randoms())
def test_sum_is_the_left_fold_of_add_bit_for_bit_and_leaves_inputs_alone(clients, rnd):
    """``Update.sum`` (and ``+``, which shares its fold) accumulates in place for speed; it
    must give exactly the bits of plain tensor ``+`` applied per component in sender order
    (mixed dtypes promoting as tensor ``+`` does), the summed weights and the merged
    metadata, and leave its inputs alone. The reference below uses no Update arithmetic."""
    ups = []
    for i, (w, v, has_enc) in enumerate(clients):
        comps = {"head": {"w": torch.tensor(v, dtype=torch.float32)}}
        if has_enc:  # encoder deltas arrive in float64 from some senders and float32 from others
            dt = torch.float64 if i % 2 else torch.float32
            comps["enc"] = {"w": torch.tensor(v, dtype=dt) * 3}
        ups.append(Update.from_delta(comps, w, sender=f"s{i:02d}", round=i % 3, num_samples=i))
    before = [{c: p["w"].clone() for c, p in u.tensors.items()} for u in ups]
    shuffled = list(ups)
    rnd.shuffle(shuffled)
    got = Update.sum(shuffled)
    # reference: per component, tensor + and float + in sender order (ups is sorted by sender)
    want_t: dict[str, torch.Tensor] = {}
    want_w: dict[str, float] = {}
    for u in ups:
        for c, params in u.tensors.items():
            want_t[c] = params["w"] if c not in want_t else want_t[c] + params["w"]
            want_w[c] = u.weights[c] if c not in want_w else want_w[c] + u.weights[c]
    assert got is not None
    assert got.meta == UpdateMeta(
        tuple(u.meta.senders[0] for u in ups),
        max(u.meta.round for u in ups),
        sum(u.meta.num_samples for u in ups),
    )
    assert got.weights == want_w and got.tensors.keys() == want_t.keys()
    for c, w_ in want_t.items():
        g = got.tensors[c]["w"]
        assert g.dtype == w_.dtype and torch.equal(g, w_)
    pair = ups[0] + ups[-1] if len(ups) > 1 else None  # + is the same fold of two
    if pair is not None:
        for c in pair.tensors:
            a, b = ups[0].tensors.get(c), ups[-1].tensors.get(c)
            ref = a["w"] + b["w"] if a and b else (a or b)["w"]  # type: ignore[index]
            assert torch.equal(pair.tensors[c]["w"], ref)
    for u, b in zip(ups, before):
        assert all(torch.equal(u.tensors[c]["w"], b[c]) for c in b)


def test_pickle_round_trip_is_exact_and_independent():
    """Updates cross process boundaries (Ray's object store) packed into one buffer: every
    dtype, shape (incl. 0-d and empty) and value must come back exactly, in separate storage."""
    import pickle

    tensors = {
        "adapter.backbone": {"a": torch.randn(4, 3), "b": torch.randn(3).double()},
        "head.t": {
            "h": torch.randn(5).half(),
            "idx": torch.arange(3),
            "empty": torch.zeros(0, 2),
            "scalar": torch.tensor(2.5),
            "mask": torch.tensor([True, False, True]),
            "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
        },
    }
    u = Update(tensors, {"adapter.backbone": 2.0, "head.t": 1.5}, UpdateMeta(("s",), 3, 7))
    v = pickle.loads(pickle.dumps(u))
    assert v.meta == u.meta and dict(v.weights) == dict(u.weights)
    assert list(v.tensors) == list(u.tensors)
    for c, params in u.tensors.items():
        assert list(v.tensors[c]) == list(params)
        for p, t in params.items():
            got = v.tensors[c][p]
            assert got.dtype == t.dtype and got.shape == t.shape, (c, p)
            assert torch.equal(got, t), (c, p)
    ptrs = [t.untyped_storage().data_ptr() for ps in v.tensors.values() for t in ps.values()]
    assert len(set(ptrs)) == len(ptrs)  # no shared storage (safetensors refuses shared tensors)
    got = v.tensors["adapter.backbone"]["a"]
    got.add_(1.0)  # writable, and writing one tensor leaves the others alone
    assert torch.equal(v.tensors["adapter.backbone"]["b"], tensors["adapter.backbone"]["b"])
    # an update of empty tensors only (an empty buffer) comes back too
    e = pickle.loads(pickle.dumps(Update({"h": {"w": torch.zeros(0, 3)}}, {"h": 1.0})))
    assert e.tensors["h"]["w"].shape == (0, 3)
