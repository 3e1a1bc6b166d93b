"""Heterogeneous LoRA ranks by resource class: clients of rank 1, 2 and 4 train in one
federation, merge exactly in product space, and load the merge back at their own rank."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.aggregators.lora import lora_pairs, truncate_rank
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.postprocess.validate import Expectation
from hierfed.registry import DATASETS
from hierfed.runtime.jobs import MergeTask, TrainJob
from hierfed.runtime.worker import WorkerCore, WorkerSetup
from hierfed.simulation import run

pytest.importorskip("sklearn")

RANKS = {"r1": 1, "r2": 2, "full": 4}
OVERRIDES = [
    "data.name=digits",
    "data.num_institutions=1",
    "data.essay_only_institutions=0",
    "data.students_per_institution=3",
    "model.d_model=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.prompt_tokens=2",
    "model.lora_rank=4",
    'model.resources={full: ["*"], r1: ["*"], r2: ["*"], light: ["head.*", "prompt.*"]}',
    "model.resource_ranks={r1: 1, r2: 2}",
    "runtime.name=local",
    "topology.name=star",
    "topology.default.aggregator=lora_exact",
]


def _core():
    cfg = load_config(None, OVERRIDES)
    fed = DATASETS.get("digits")(cfg.data, cfg.seed)
    classes = ["full", "r1", "r2"]
    fed = dataclasses.replace(
        fed,
        clients=[dataclasses.replace(c, resource=classes[i]) for i, c in enumerate(fed.clients)],
    )
    return WorkerCore(WorkerSetup(cfg, fed)), fed


def _parent(core):
    """The initial state with non-zero LoRA B, so that every adapter has rank 4 to truncate."""
    state = core.initial_state()
    g = torch.Generator().manual_seed(7)
    state["adapter.backbone"] = {
        k: (torch.randn(v.shape, generator=g) if "lora_B" in k else v)
        for k, v in state["adapter.backbone"].items()
    }
    return state


def _products(params):
    return {ka: params[kb].double() @ params[ka].double() for ka, kb in lora_pairs(params)}


def test_clients_train_only_their_rank_and_merge_exactly_in_product_space():
    core, fed = _core()
    parent = _parent(core)
    jobs = [
        TrainJob(
            client_id=c.id,
            parent_id="global",
            tier="global",
            round=1,
            key=(1, c.id),
            trains=core.spec.holds(c),
            sends=core.spec.holds(c),
        )
        for c in fed.clients
    ]
    metas, updates = core.train(jobs, {"global": parent})
    assert all(m.error is None for m in metas)
    absolute = {}
    for c in fed.clients:
        u = updates[c.id]
        w = u.weights["adapter.backbone"]
        ab = {
            k: parent["adapter.backbone"][k] + t / w
            for k, t in u.tensors["adapter.backbone"].items()
        }
        r = RANKS[c.resource]
        for ka, kb in lora_pairs(ab):
            # zero up to the float rounding of (parent + w * delta) / w
            assert float(ab[ka][r:].abs().sum()) < 1e-5 and float(ab[kb][:, r:].abs().sum()) < 1e-5
            assert torch.linalg.matrix_rank(ab[kb] @ ab[ka], atol=1e-5) <= r
        absolute[c.id] = (ab, w)
    tasks = [
        MergeTask(
            node_id="global",
            tier="global",
            round=1,
            key=(1,),
            state=parent,
            expectations=tuple(
                Expectation(c.id, frozenset(core.spec.holds(c)), exact=True, max_weight=1e9)
                for c in fed.clients
            ),
        )
    ]
    (res,) = core.merge(tasks, updates)
    assert not res.rejected
    merged = _products(res.state["adapter.backbone"])
    wsum = sum(w for _, w in absolute.values())
    for ka in merged:
        mean = sum(w * _products(ab)[ka] for ab, w in absolute.values()) / wsum
        u, s, vh = torch.linalg.svd(mean)
        best = (u[:, :4] * s[:4]) @ vh[:4]  # the best rank-4 approximation of the mean product
        assert torch.allclose(merged[ka], best, atol=1e-5)
    # back down: each rank's view is the best rank-r approximation of the merged adapter
    for r in (1, 2):
        view = _products(truncate_rank(res.state["adapter.backbone"], r))
        for ka, prod in view.items():
            u, s, vh = torch.linalg.svd(merged[ka])
            assert torch.allclose(prod, (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5)
    # and clients of every rank train again from the merged state
    metas2, updates2 = core.train(
        [dataclasses.replace(j, round=2) for j in jobs], {"global": res.state}
    )
    assert all(m.error is None for m in metas2) and set(updates2) == {c.id for c in fed.clients}


def test_rank_zero_and_light_clients_send_no_adapter(tmp_path):
    cfg = load_config(
        None,
        [
            *OVERRIDES,
            "data.students_per_institution=4",
            "model.resource_ranks={r1: 0, r2: 2}",
            "data.options={resource_mix: {r1: 1, r2: 1, light: 1, full: 1}}",
            "rounds=2",
        ],
        out=str(tmp_path / "run"),
    )
    res = run(cfg, write=False)
    fed = DATASETS.get("digits")(cfg.data, cfg.seed)
    kinds = {c.id: c.resource for c in fed.clients}
    sent: dict[str, set[str]] = {}
    for rec in res.ledger.records:
        if rec.direction == "up":
            sent.setdefault(kinds[rec.src], set()).add(rec.component)
    assert set(kinds.values()) == {"r1", "r2", "light", "full"}  # exact quotas: one client each
    assert set(sent) == {"r1", "r2", "light", "full"}
    for kind, comps in sent.items():
        has_adapter = "adapter.backbone" in comps
        assert has_adapter == (kind in ("r2", "full")), (kind, comps)
        if kind == "light":
            assert all(c.startswith(("head.", "prompt.")) for c in comps)


def test_resource_ranks_are_validated():
    with pytest.raises(ConfigError, match="model.resource_ranks.r1"):
        load_config(None, [*OVERRIDES, "model.resource_ranks={r1: 8}"])
    with pytest.raises(ConfigError, match="model.resource_ranks.nope"):
        load_config(None, [*OVERRIDES, "model.resource_ranks={nope: 1}"])
