"""SecAgg+ in simulation: the server sees only masked inputs and the sum, the unmasked sum is
the exact integer sum, dropouts are recovered from shares, the dequantized sum is within the
stated quantization error, and a run records the protocol's bytes in the ledger."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.secagg import shamir
from hierfed.secagg.edge import secure_sum
from hierfed.secagg.protocol import (
    Masked,
    Params,
    SecAggFailure,
    keyed_entropy,
    ring_neighbours,
    run_protocol,
)
from hierfed.secagg.quantize import levels_of
from hierfed.simulation import run
from hierfed.update import Update
from tests.conftest import tiny_overrides

M = 2**32


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    secret = random.Random(1).getrandbits(256)
    shares = shamir.share(secret, n=5, t=3, rng=random.Random(2))
    for picked in ([0, 1, 2], [4, 2, 0], [1, 3, 4]):
        assert shamir.reconstruct([shares[i] for i in picked]) == secret
    assert shamir.reconstruct(shares[:2]) != secret  # t - 1 shares interpolate another line


def _plain(ids, dim=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randint(0, 2**22, (dim,), generator=g, dtype=torch.int64) for i in ids}


def _protocol(plain, *, drop=(), t=2, num_shares=0):
    ids = sorted(plain)
    params = Params(M, t, ring_neighbours(ids, num_shares), "test")
    return run_protocol(
        plain,
        params=params,
        server_id="server",
        drop=set(drop),
        entropy_of=lambda i: keyed_entropy(0, i),
        modulus_nbytes=4,
    )


def _server_saw_no_plain_vector(server, plain):
    vectors = [m for m in server.received if isinstance(m, Masked)]
    assert vectors and all(isinstance(m, Masked) for m in vectors)
    tensors = [m.y for m in vectors] + list(server.masked.values())
    for t in tensors:
        for x in plain.values():
            assert not torch.equal(t, x)
            # masks are uniform mod M: about every entry differs from the plain input
            assert float((t != x).double().mean()) > 0.9
    held = [v for v in vars(server).values() if isinstance(v, torch.Tensor)]
    assert held == []  # nothing but its logs and the masked inputs


def test_server_learns_only_the_exact_sum():
    plain = _plain(["a", "b", "c", "d"])
    total, alive, log, server = _protocol(plain)
    assert alive == ["a", "b", "c", "d"]
    assert torch.equal(total, sum(plain.values()) % M)  # exact, integers
    _server_saw_no_plain_vector(server, plain)
    # the masked inputs alone do not sum to it: the self masks are still in
    masked_sum = sum(server.masked.values()) % M
    assert not torch.equal(masked_sum, total)
    stages = {m.stage for m in log}
    assert stages == {"keys", "shares", "masked", "unmask"}


def test_dropout_after_masking_is_recovered_from_the_survivors_shares():
    plain = _plain(["a", "b", "c", "d", "e"], seed=1)
    total, alive, _, server = _protocol(plain, drop={"c"}, t=3)
    assert alive == ["a", "b", "d", "e"]
    assert torch.equal(total, sum(plain[i] for i in alive) % M)
    _server_saw_no_plain_vector(server, plain)
    # SecAgg+'s sparse graph: ring neighbourhoods of 3, one dropout
    total, alive, _, _ = _protocol(plain, drop={"b"}, t=2, num_shares=3)
    assert torch.equal(total, sum(plain[i] for i in alive) % M)


def test_too_few_survivors_cannot_unmask():
    plain = _plain(["a", "b", "c"], seed=2)
    with pytest.raises(SecAggFailure, match="threshold is 3"):
        _protocol(plain, drop={"a"}, t=3)


def _updates(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for i in range(n):
        w = float(10 + 5 * i)
        delta = {
            "head.t": {
                "w": torch.randn(6, 3, generator=g) * 0.1,
                "b": torch.randn(3, generator=g) * 0.1,
            }
        }
        if i != 1:  # member 1 does not hold the encoder: its weight there is 0
            delta["encoder.x"] = {"w": torch.randn(4, generator=g) * 0.1}
        ups.append(Update.from_delta(delta, w, sender=f"m{i}", round=1))
    like = {
        "head.t": {"w": torch.zeros(6, 3), "b": torch.zeros(3)},
        "encoder.x": {"w": torch.zeros(4)},
    }
    return ups, like


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_secure_sum_is_within_the_stated_quantization_error(drop):
    ups, like = _updates()
    opts = {"drop_after_masking": drop}
    scale = 40.0  # the members' largest weight bound
    # find a round key where exactly one member drops (the draw is keyed: deterministic)
    keys = [(k,) for k in range(40)]
    for key in keys:
        summed, survivors, report, server = secure_sum(
            ups,
            like=like,
            components=["head.t", "encoder.x"],
            scale=scale,
            opts=opts,
            seed=0,
            key=key,
            node="g",
        )
        if (len(report.dropped) == 1) == (drop > 0):
            break
    assert len(survivors) == len(ups) - len(report.dropped)
    plain = Update.sum(survivors)
    n, levels = len(survivors), levels_of(2**22)
    bound = n * scale * 8.0 / levels  # stated in hierfed.secagg.edge
    assert report.bound == pytest.approx(bound)
    for c, params in plain.tensors.items():
        for p, t in params.items():
            err = (summed.tensors[c][p].double() - t.double()).abs().max()
            assert float(err) <= bound + 1e-6 * float(t.abs().max())
        assert abs(summed.weights[c] - plain.weights[c]) <= n * scale / levels
    # the server got masked inputs only: each differs from that member's quantized input
    assert {m.src for m in server.received if isinstance(m, Masked)} == {
        u.meta.senders[0] for u in survivors
    }
    assert summed.meta.senders == tuple(sorted(u.meta.senders[0] for u in survivors))


def _secure_overrides(**extra):
    return tiny_overrides(
        **{
            "runtime.name": "local",
            "topology.tiers.global.secure_aggregation": "secagg+",
            **extra,
        }
    )


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg") / "run"
    extra = {
        "topology.tiers.global.postprocess": "[gaussian]",
        "topology.tiers.global.postprocess_options": "{gaussian: {clip: 1.0, noise_multiplier: 0.5}}",
    }
    run(load_config(None, _secure_overrides(**extra), out=str(out)))
    return out


def test_a_secure_run_records_the_protocol_in_the_ledger(secure_run):
    ledger = CommLedger.load(secure_run / "ledger.csv")
    top = [r for r in ledger.records if r.edge in ("institution->global", "global->institution")]
    comps = {r.component for r in top}
    assert {"secagg.keys", "secagg.shares", "secagg.unmask"} <= comps
    # a masked input: 4 bytes (mod 2^32) per value and one per weight, per component
    from hierfed.model.m3t import build_model, model_spec
    from hierfed.simulation import build_federation

    cfg = load_config(secure_run / "config.yaml")
    fed = build_federation(cfg)
    spec = model_spec(build_model(cfg.model, fed, cfg.seed), fed, cfg.model)
    masked = [r for r in top if r.direction == "up" and not r.component.startswith("secagg.")]
    assert masked
    for r in masked:
        numel = sum(math.prod(s) for s in dict(spec.components[r.component].shapes).values())
        assert r.nbytes == 4 * (numel + 1), r
    # keys: two 32-byte public keys up per institution and round
    keys_up = [r for r in top if r.component == "secagg.keys" and r.direction == "up"]
    assert keys_up and all(r.nbytes == 64 for r in keys_up)


def test_dp_report_says_noise_is_added_before_masking(secure_run):
    last = json.loads((secure_run / "metrics.jsonl").read_text().splitlines()[-1])
    report = last["dp_client"]["global"]
    assert report["unit"] == "institution" and "before masking" in report["secure_aggregation"]


def test_secure_run_matches_the_plain_run_within_quantization(tmp_path, secure_run):
    from safetensors.torch import load_file

    plain_out = tmp_path / "plain"
    extra = {
        "topology.tiers.global.postprocess": "[gaussian]",
        "topology.tiers.global.postprocess_options": "{gaussian: {clip: 1.0, noise_multiplier: 0.5}}",
    }
    over = [o for o in _secure_overrides(**extra) if "secure_aggregation" not in o]
    run(load_config(None, over, out=str(plain_out)))
    a = load_file(str(secure_run / "final_state.safetensors"))
    b = load_file(str(plain_out / "final_state.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < worst < 1e-3  # masked and quantized, yet the same model up to quantization


def test_secagg_refuses_rules_that_need_individual_updates():
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        load_config(None, _secure_overrides(**{"topology.tiers.global.aggregator": "median"}))
    with pytest.raises(ConfigError, match="codec int8"):
        load_config(None, _secure_overrides(**{"topology.tiers.global.postprocess": "[int8]"}))
    with pytest.raises(ConfigError, match="reconstruction_threshold"):
        load_config(
            None,
            _secure_overrides(
                **{
                    "topology.tiers.global.secure_aggregation_options": "{reconstruction_threshold: 0}"
                }
            ),
        )


def test_a_weight_sum_at_its_bound_does_not_come_out_above_it():
    # every member at its full weight: the plain sum equals the sum of the bounds exactly, and
    # the dequantized one (off by up to n * scale / L) is clamped to it, so the parent's
    # validation does not refuse the node's update for a weight above its bound
    ups, like = _updates()
    bounds = {u.meta.senders[0]: u.weights["head.t"] for u in ups}
    args = {"like": like, "components": ["head.t", "encoder.x"], "scale": 40.0, "opts": {}}
    free, *_ = secure_sum(ups, **args, seed=0, key=(1,), node="g")
    capped, *_ = secure_sum(ups, **args, seed=0, key=(1,), node="g", bounds=bounds)
    total = sum(bounds.values())
    assert free.weights["head.t"] != total  # the rounding error the clamp removes
    assert capped.weights["head.t"] == total
