"""SecAgg+ on the top edge with Flower's real ``SecAggPlusWorkflow`` and ``secaggplus_mod``,
the messages relayed in memory instead of over a SuperLink (the transport is tested in
test_deploy_flower.py): the server holds only masked vectors and their sum, the sum is the
plain sum within the stated quantization error, also with one institution dropped, and the
protocol's bytes land in the ledger."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from hierfed.config import load_config, to_yaml
from hierfed.deploy.node import institution_profile
from hierfed.deploy.secagg import Layout
from hierfed.deploy.server import LocalSites
from hierfed.deploy.wire import state_to_bytes
from hierfed.errors import ConfigError
from hierfed.simulation import build_federation
from tests.conftest import tiny_overrides

FULL = os.environ.get("HIERFED_DEPLOY_FULL") == "1"  # the heavier drills (docs/deployment.md)

OV = tiny_overrides(
    **{"runtime.name": "local", "eval.equity": "false", "deployment.secagg": "true", "rounds": 1}
)


class Relay:
    """A Grid's ``send_and_receive`` that hands each message to the node's ClientApp in this
    process (contexts kept per node, as a SuperNode keeps them); ``drop`` makes a node fail
    from a stage on; ``seen`` is everything the server received."""

    def __init__(self, nodes: dict[int, Context], *, drop: tuple[int, str] | None = None) -> None:
        from hierfed.deploy.flower_app import client

        self.app, self.ctx, self.drop = client, nodes, drop
        self.seen: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            stage = m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
            if self.drop and self.drop[0] == node and stage in self.drop[1]:
                out.append(Message(Error(0, "gone"), reply_to=m))
                continue
            # a copy, as if serialized: the mod pops keys, and the workflow shares one content
            out.append(self.app(copy.deepcopy(m), self.ctx[node]))
        self.seen += out
        return out


@pytest.fixture(autouse=True)
def _server_identity():
    """What a ServerApp process has set when it creates messages (Flower's TaskIdentity)."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def _node_contexts(nodes, workdir):
    """Flower contexts of the sites' SuperNodes (node id -> context), as a SuperNode makes them."""
    return {
        nid: Context(
            run_id=7,
            node_id=nid,
            node_config={"institution": inst, "workdir": str(workdir)},
            state=RecordDict(),
            run_config={},
        )
        for inst, nid in nodes.items()
    }


def _setup(tmp_path, **drop):
    cfg = load_config(None, OV, out=str(tmp_path / "run"))
    fed = build_federation(cfg)
    sites = LocalSites(cfg, tmp_path / "plain")  # the same subtrees without masking
    from hierfed.runtime.local import LocalRuntime

    rt = LocalRuntime(cfg.runtime)
    from hierfed.runtime.worker import WorkerSetup

    rt.start(WorkerSetup(cfg, fed))
    _, initial = rt.model_info()
    insts = sorted(sites.sites)
    above = initial  # every component is global by default
    plain = sites(1, (0,), dict.fromkeys(insts, above))
    nodes = {inst: 100 + k for k, inst in enumerate(insts)}
    ctxs = _node_contexts(nodes, tmp_path / "masked")
    fields = {
        inst: {
            "institution": inst,
            "round": 1,
            "key": "[0]",
            "config": to_yaml(cfg),
            "expected": json.dumps(institution_profile(fed, inst)),
            "state": state_to_bytes(above),
        }
        for inst in insts
    }
    scale = float(sum(c.num_train for c in fed.clients))
    layout = Layout.of(above, scale)
    relay = Relay(ctxs, **drop)
    server_ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    from hierfed.deploy.secagg_flower import secagg_round

    out, inner = secagg_round(
        grid=relay,
        context=server_ctx,
        cfg=cfg,
        nodes=nodes,
        messages=fields,
        layout=layout,
        rnd=1,
    )
    return cfg, plain, out, relay, layout, nodes


def _close(summed, parts, layout, n):
    """The masked sum against the plain sum of ``parts``: within ``n`` quantization steps
    (scaled back by the layout's scale) per value, weights too."""
    step = 2 * 8.0 / 2**22  # deployment.secagg_clip, 2**secagg_bits (defaults)
    tol = n * step * layout.scale * 1.01
    for c, params in summed.tensors.items():
        for p, t in params.items():
            want = sum(u.tensors[c][p].double() for u in parts if c in u.tensors)
            assert float((t.double() - want).abs().max()) <= tol, f"{c}/{p}"
        want_w = sum(u.weights.get(c, 0.0) for u in parts)
        assert abs(summed.weights[c] - want_w) <= tol
    return tol


def test_secagg_sum_equals_the_plain_sum_within_quantization(tmp_path):
    cfg, plain, out, relay, layout, nodes = _setup(tmp_path)
    replies = [out[i] for i in sorted(out)]
    carriers = [r for r in replies if r.update is not None]
    assert len(carriers) == 1  # the server got one sum, never one institution's update
    summed = carriers[0].update
    assert summed.meta.senders == tuple(sorted(out))
    parts = [plain[i].update for i in sorted(plain)]
    tol = _close(summed, parts, layout, len(parts))
    assert tol < 0.01  # for these sizes: 3 institutions, a few hundred rows
    # what the server received: masked integers mod 2**32, no plain arrays
    for m in relay.seen:
        assert all(len(rec) == 0 for rec in m.content.array_records.values())
    masked = [
        m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        for m in relay.seen
        if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]
    ]
    assert len(masked) == 3
    from flwr.common import bytes_to_ndarray

    first = bytes_to_ndarray(masked[0][1])  # [0] is the weight factor; [1] a first tensor
    assert first.size > 8 and np.unique(first).size > first.size * 0.9  # looks uniform
    # the protocol's four stages, measured per institution, for the ledger
    r = replies[0]
    assert set(r.sizes) == {
        "secagg.setup",
        "secagg.share_keys",
        "secagg.collect_masked_vectors",
        "secagg.unmask",
    }
    assert r.sizes["secagg.collect_masked_vectors"] > 4 * sum(
        t.numel() for p in parts[0].tensors.values() for t in p.values()
    )
    assert set(r.down_sizes) == set(r.sizes)


def test_secagg_tolerates_one_institution_dropping_mid_round(tmp_path):
    cfg, plain, out, relay, layout, nodes = _setup(
        tmp_path, drop=(101, ("collect_masked_vectors", "unmask"))
    )
    gone = [i for i, n in nodes.items() if n == 101][0]
    assert isinstance(out[gone], str) and "dropped out" in out[gone]
    summed = next(r.update for r in out.values() if not isinstance(r, str) and r.update)
    assert gone not in summed.meta.senders
    parts = [plain[i].update for i in sorted(plain) if i != gone]
    _close(summed, parts, layout, len(parts))


def test_secagg_refuses_a_robust_global_aggregator():
    from hierfed.deploy.secagg import check_secagg

    cfg = load_config(None, OV + ["topology.tiers.global.aggregator=median"])
    with pytest.raises(ConfigError, match="associative aggregator"):
        check_secagg(cfg)


@pytest.mark.skipif(not FULL, reason="set HIERFED_DEPLOY_FULL=1 (a second run)")
def test_a_secagg_run_ends_within_quantization_of_the_simulation(tmp_path):
    """Two rounds: the root merges the masked sum (its weights quantized too) like the plain
    updates; the final state is the simulated one's within the quantization."""
    from hierfed.deploy.secagg_flower import secagg_round
    from hierfed.deploy.server import run_server
    from hierfed.simulation import run

    ov = OV + ["rounds=2"]
    sim = run(load_config(None, ov, out=str(tmp_path / "sim")))
    cfg = load_config(None, ov, out=str(tmp_path / "dep"))
    fed = build_federation(cfg)
    insts = sorted({"/".join(c.path[:2]) for c in fed.clients})
    nodes = {inst: 100 + k for k, inst in enumerate(insts)}
    relay = Relay(_node_contexts(nodes, tmp_path / "nodes"))
    server_ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    scale = float(sum(c.num_train for c in fed.clients))

    def dispatch(rnd, key, above):
        fields = {
            i: {
                "institution": i,
                "round": rnd,
                "key": json.dumps(list(key)),
                "config": to_yaml(cfg),
                "expected": json.dumps(institution_profile(fed, i)),
                "state": state_to_bytes(above[i]),
            }
            for i in above
        }
        layout = Layout.of(above[insts[0]], scale)
        out, _ = secagg_round(
            grid=relay,
            context=server_ctx,
            cfg=cfg,
            nodes=nodes,
            messages=fields,
            layout=layout,
            rnd=rnd,
        )
        return out

    dep = run_server(cfg, dispatch)
    assert [m["rejected"] for m in dep.metrics[1:]] == [0, 0]
    worst = max(
        float((dep.final_state[c][p] - t).abs().max())
        for c, params in sim.final_state.items()
        for p, t in params.items()
    )
    # quantized, not bit-identical: a round's merge is off by about n * step (~1e-5 here), and
    # the next round's training carries that on. Flower rounds stochastically with numpy's
    # unseeded global RNG, so the gap varies run to run: 2 of 9 runs here were above 1e-3, the
    # largest 3.0e-3 (the deploy benchmark saw 2.3e-3), hence the bound one order above
    assert 0 < worst < 1e-2
    secagg = {k: v for k, v in dep.ledger.by_component().items() if k.startswith("secagg.")}
    assert len(secagg) == 4 and min(secagg.values()) > 0
