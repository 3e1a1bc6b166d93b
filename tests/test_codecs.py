"""Codecs on any edge: int8 is unbiased, top-k with error feedback delivers the whole delta,
the ledger records the encoded sizes, top-k's residual survives a resume bit-identically,
and a lower-rank client is charged for its rank only."""

from __future__ import annotations

import math

import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.postprocess.base import PostContext, apply_chain
from hierfed.postprocess.broadcast import encode_state_keyed
from hierfed.postprocess.codecs import Fp16, Int8, TopK
from hierfed.simulation import run
from hierfed.update import Update
from tests.conftest import tiny_overrides
from tests.test_gossip_resume import _digest, resume_from_round_1


def _ctx(rnd: int, sender: str = "s") -> PostContext:
    return PostContext(sender, "p", "global", rnd, 0)


def _upd(x: torch.Tensor, w: float = 3.0, rnd: int = 0) -> Update:
    return Update.from_delta({"head.t": {"w": x}}, w, sender="s", round=rnd)


def test_int8_is_unbiased_within_its_variance():
    # values at known fractions of the grid: x / s = 127 (the max), and p = frac(x / s)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor([1.27]), torch.rand(199, generator=g) * 2.54 - 1.27])
    s = 1.27 / 127
    draws = 400
    dec = torch.stack(
        [
            apply_chain([Int8({})], _upd(x, rnd=r), _ctx(r))[0].mean()["head.t"]["w"]
            for r in range(draws)
        ]
    )
    q = dec / s
    assert torch.allclose(q, q.round(), atol=1e-3) and float(q.abs().max()) <= 127 + 1e-3
    # each decoded value is floor(x/s) * s or that plus s, with P(up) = p = frac(x/s):
    # per element the mean of `draws` draws has variance s^2 p (1 - p) / draws
    p = (x / s - torch.floor(x / s)).double()
    err = (dec.double() - x.double()).mean(0)
    var_mean = (s**2 * p * (1 - p) / draws).sum() / len(x) ** 2  # of the mean over elements
    assert abs(float(err.mean())) <= 4 * math.sqrt(float(var_mean))
    per_elem_sd = torch.sqrt(s**2 * p * (1 - p) / draws) + 1e-7
    assert float((err.abs() / per_elem_sd).max()) <= 5.5
    # the same check catches a biased rounding: round-to-nearest is off by up to s / 2
    nearest = torch.round(x / s) * s
    assert float(((nearest - x).double().abs() / per_elem_sd).max()) > 5.5


def test_int8_is_keyed_by_sender_round_and_component():
    x = torch.linspace(-1, 1, 50)
    a = apply_chain([Int8({})], _upd(x), _ctx(1))[0].tensors["head.t"]["w"]
    assert torch.equal(a, apply_chain([Int8({})], _upd(x), _ctx(1))[0].tensors["head.t"]["w"])
    assert not torch.equal(a, apply_chain([Int8({})], _upd(x), _ctx(2))[0].tensors["head.t"]["w"])
    assert not torch.equal(
        a, apply_chain([Int8({})], _upd(x), _ctx(1, "t"))[0].tensors["head.t"]["w"]
    )


def test_codec_sizes_count_values_indices_and_scales():
    u = Update.from_delta(
        {"head.t": {"w": torch.zeros(10, 10), "b": torch.zeros(10)}}, 2.0, sender="s", round=0
    )
    assert apply_chain([Fp16({})], u, _ctx(0))[1] == {"head.t": 2 * 110 + 4}
    assert apply_chain([Int8({})], u, _ctx(0))[1] == {"head.t": (100 + 4) + (10 + 4) + 4}
    # ceil(0.05 * 100) = 5 and ceil(0.05 * 10) = 1 values, each fp32 + a 2-byte index
    assert apply_chain([TopK({"ratio": 0.05})], u, _ctx(0))[1] == {"head.t": 6 * 6 + 4}


def test_topk_error_feedback_delivers_the_whole_delta():
    g = torch.Generator().manual_seed(3)
    codec, memory = TopK({"ratio": 0.1}), None
    true_sum = torch.zeros(40)
    delivered_sum = torch.zeros(40)
    for r in range(12):
        delta = torch.randn(40, generator=g)
        out, memory = codec.deliver(_upd(delta, w=5.0, rnd=r), _ctx(r), memory)
        sent = out.mean()["head.t"]["w"]
        assert int((sent != 0).sum()) == 4  # ceil(0.1 * 40)
        true_sum += delta
        delivered_sum += sent
    residual = memory["head.t"]["w"]
    assert torch.allclose(delivered_sum, true_sum - residual, atol=1e-5, rtol=0)
    # without the residual the receiver would miss a large part of the delta
    assert float(residual.abs().sum()) > 1.0


def test_topk_on_a_lower_rank_sender_picks_from_its_slots_only():
    a = torch.tensor([[0.125, 0.25], [9.0, 9.0]])  # slot 1 is off the wire (minus the parent's)
    b = torch.tensor([[0.375, 8.0], [0.0625, 7.0]])
    u = Update.from_delta(
        {"adapter.x": {"l.lora_A.weight": a, "l.lora_B.weight": b}}, 1.0, sender="s", round=0
    )
    ctx = PostContext("s", "p", "global", 0, 0, rank=1)
    out, mem = TopK({"ratio": 0.5}).deliver(u, ctx, None)
    m = out.mean()["adapter.x"]
    assert m["l.lora_A.weight"].tolist() == [[0.0, 0.25], [9.0, 9.0]]
    assert m["l.lora_B.weight"].tolist() == [[0.375, 8.0], [0.0, 7.0]]
    assert mem["adapter.x"]["l.lora_A.weight"].tolist() == [[0.125, 0.0], [0.0, 0.0]]
    # the payload: ceil(0.5 * 2) values of A's slot 0 and ceil(0.5 * 2) of B's, 6 bytes each
    assert apply_chain([TopK({"ratio": 0.5})], u, ctx)[1] == {"adapter.x": 2 * 6 + 4}


def test_broadcast_int8_is_keyed_and_within_one_step():
    st = {"head.t": {"w": torch.tensor([0.5, -0.25, 1.0 / 3])}}
    a = encode_state_keyed("int8", st, seed=0, rnd=1, key=(0,), sender="g")["head.t"]["w"]
    assert torch.equal(
        a, encode_state_keyed("int8", st, seed=0, rnd=1, key=(0,), sender="g")["head.t"]["w"]
    )
    assert encode_state_keyed("none", st, seed=0, rnd=1, key=(), sender="g") is st
    assert float((a - st["head.t"]["w"]).abs().max()) <= 1.0 / 127 + 1e-7


CODEC_RUN = {
    "runtime.name": "local",
    "rounds": 3,
    "checkpoint.keep": 3,
    "topology.tiers.global.postprocess": "[topk]",
    "topology.tiers.global.postprocess_options": "{topk: {ratio: 0.05}}",
    "topology.tiers.global.broadcast_codec": "int8",
    "topology.tiers.institution.postprocess": "[int8]",
    "topology.tiers.institution.broadcast_codec": "fp16",
}


@pytest.fixture(scope="module")
def codec_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("codecs") / "run"
    run(load_config(None, tiny_overrides(**CODEC_RUN), out=str(out)))
    return out


def test_ledger_counts_encoded_sizes(codec_run):
    from hierfed.model.m3t import build_model, model_spec
    from hierfed.simulation import build_federation

    cfg = load_config(codec_run / "config.yaml")
    fed = build_federation(cfg)
    spec = model_spec(build_model(cfg.model, fed, cfg.seed), fed, cfg.model)
    shapes = {c: dict(s.shapes) for c, s in spec.components.items()}
    ledger = CommLedger.load(codec_run / "ledger.csv")

    def numel(shape):
        return math.prod(shape)

    for r in ledger.records:
        tensors = [numel(s) for s in shapes[r.component].values()]
        if r.edge == "institution->global":  # top-k 5%: k values (4 B) + 2-byte indices
            k = [min(n, max(1, math.ceil(0.05 * n))) for n in tensors]
            assert r.nbytes == sum(6 * x for x in k) + 4, r
        elif r.edge == "student->institution":  # int8: n + a scale per tensor, + the weight
            assert r.nbytes == sum(n + 4 for n in tensors) + 4, r
        elif r.edge == "global->institution":  # the state in int8
            assert r.nbytes == sum(n + 4 for n in tensors), r
        else:  # institution->student: the state in fp16
            assert r.edge == "institution->student" and r.nbytes == 2 * sum(tensors), r


def test_topk_residual_resumes_bit_identically(codec_run):
    reference = _digest(codec_run)
    resume_from_round_1(codec_run)
    assert _digest(codec_run) == reference


def test_codec_settings_refused_before_work():
    with pytest.raises(ConfigError, match="broadcast_codec"):
        load_config(None, tiny_overrides(**{"topology.tiers.global.broadcast_codec": "topk"}))
    with pytest.raises(ConfigError, match="gossip has no broadcast"):
        load_config(
            None, tiny_overrides(**{"topology.default.broadcast_codec": "fp16"}), topology="gossip"
        )
    with pytest.raises(ConfigError, match="needs a parent that merges"):
        load_config(
            None, tiny_overrides(**{"topology.default.postprocess": "[topk]"}), topology="gossip"
        )
    with pytest.raises(ConfigError, match="last"):
        load_config(None, tiny_overrides(**{"topology.tiers.global.postprocess": "[topk, clip]"}))


def test_lower_rank_clients_are_charged_for_their_rank_only():
    pytest.importorskip("sklearn")
    import dataclasses

    from hierfed.aggregators.lora import lora_pairs
    from hierfed.data.federation import ClientData
    from hierfed.registry import DATASETS
    from hierfed.runtime.jobs import TrainJob
    from hierfed.runtime.worker import WorkerCore, WorkerSetup
    from tests.test_lora_ranks import OVERRIDES, RANKS, _parent

    cfg = load_config(None, [*OVERRIDES, "topology.default.postprocess=[int8]"])
    fed = DATASETS.get("digits")(cfg.data, cfg.seed)
    classes = ["full", "r1", "r2"]
    fed = dataclasses.replace(
        fed,
        clients=[dataclasses.replace(c, resource=classes[i]) for i, c in enumerate(fed.clients)],
        # a few rows each: the sizes do not depend on how long a client trains
        train={
            cid: ClientData(
                {k: v[:16] for k, v in d.inputs.items()}, {k: v[:16] for k, v in d.labels.items()}
            )
            for cid, d in fed.train.items()
        },
    )
    core = WorkerCore(WorkerSetup(cfg, fed))
    parent = _parent(core)
    jobs = [
        TrainJob(c.id, "global", "global", 1, (1, c.id), core.spec.holds(c), core.spec.holds(c))
        for c in fed.clients
    ]
    metas, updates = core.train(jobs, {"global": parent})
    shapes = dict(core.spec.components["adapter.backbone"].shapes)
    pairs = lora_pairs({k: torch.zeros(s) for k, s in shapes.items()})
    lora_keys = {k for pair in pairs for k in pair}
    others = sum(math.prod(s) + 4 for k, s in shapes.items() if k not in lora_keys)
    sizes = {}
    for m, c in zip(metas, fed.clients):
        r = RANKS[c.resource]
        # int8: r rows of A (r x in) and r columns of B (out x r), each tensor with its scale
        on_wire = sum(r * shapes[ka][1] + 4 + shapes[kb][0] * r + 4 for ka, kb in pairs)
        assert m.sizes["adapter.backbone"] == on_wire + others + 4, c.resource
        sizes[c.resource] = m.sizes["adapter.backbone"]
        # the slots off the wire arrive exactly: the absolute factors stay zero there
        u = updates[c.id]
        w = u.weights["adapter.backbone"]
        for ka, _ in pairs:
            a = parent["adapter.backbone"][ka] + u.tensors["adapter.backbone"][ka] / w
            assert float(a[r:].abs().sum()) < 1e-5
    assert sizes["r1"] < sizes["r2"] < sizes["full"]
