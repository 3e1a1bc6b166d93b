"""Component scopes: an institution-scoped head is merged only among that institution's
students, local components never leave their client, and personalized evaluation is reported."""

from __future__ import annotations

import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.config import load_config
from hierfed.ledger import CommLedger
from hierfed.model.m3t import build_model, model_spec
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.base import make_runtime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation, run
from tests.conftest import play, tiny_overrides


def _cfg(tmp_path, **extra):
    return load_config(
        None,
        tiny_overrides(**{"runtime.name": "local", **extra}),
        topology="hierarchical",
        out=str(tmp_path / "run"),
    )


def _rounds(cfg, rounds: int):
    """Run ``rounds`` rounds by hand; returns (topology, ledger, initial state, federation)."""
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    spec = model_spec(model, fed, cfg.model)
    initial = model.component_state()
    topo = TOPOLOGIES.get(cfg.topology.name)(cfg=cfg, federation=fed, spec=spec)
    topo.init(initial)
    rt = make_runtime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    ledger = CommLedger()
    try:
        for r in range(1, rounds + 1):
            play(topo, r, rt, ledger)
    finally:
        rt.shutdown()
    return topo, ledger, initial, fed


def _eq(a, b) -> bool:
    return all(torch.equal(a[p], b[p]) for p in a)


def test_institution_scoped_head_is_merged_only_among_its_students(tmp_path):
    scopes = '{"head.*": institution}'
    topo, ledger, initial, fed = _rounds(_cfg(tmp_path, **{"model.scopes": scopes}), 1)
    # without institution 02's students: institution 00's head must come out bit-identical
    topo2, _, _, _ = _rounds(_cfg(tmp_path, **{"model.scopes": scopes, "data.max_clients": 6}), 1)
    states, states2 = topo.engine.states, topo2.engine.states
    head = "head.essay_topic"
    assert _eq(states["global"][head], initial[head])  # never merged at the root
    assert not _eq(states["global/inst-00"][head], initial[head])
    assert not _eq(states["global/inst-00"][head], states["global/inst-01"][head])
    assert _eq(states["global/inst-00"][head], states2["global/inst-00"][head])
    # ...while a global component does see the third institution
    assert not _eq(states["global"]["adapter.backbone"], states2["global"]["adapter.backbone"])
    up_to_root = {r.component for r in ledger.records if r.edge == "institution->global"}
    assert up_to_root and not any(c.startswith("head.") for c in up_to_root)
    assert any(r.component == head for r in ledger.records if r.edge == "student->institution")
    student = "global/inst-00/student-000"
    assert _eq(topo.personalized_state(student)[head], states["global/inst-00"][head])
    # a client without the image modality sends no image encoder
    no_image = [c.id for c in fed.clients if "image" not in c.modalities]
    assert no_image
    assert not any(r.component == "encoder.image" and r.src in no_image for r in ledger.records)


def test_local_components_never_appear_in_the_ledger(tmp_path):
    topo, ledger, initial, fed = _rounds(
        _cfg(tmp_path, **{"model.scopes": '{"prompt.*": local}'}), 2
    )
    assert not any(r.component.startswith("prompt.") for r in ledger.records)
    assert any(r.component.startswith("head.") for r in ledger.records)
    for c in fed.clients:
        own = topo.clients.local[c.id]
        assert set(own) == {f"prompt.{t}" for t in c.tasks}
        p = f"prompt.{c.tasks[0]}"
        assert not _eq(own[p], initial[p])  # trained, kept at the client
        assert _eq(topo.personalized_state(c.id)[p], own[p])
        assert _eq(topo.global_state()[p], initial[p])


def test_personalized_evaluation_is_reported_per_client(tmp_path):
    cfg = _cfg(
        tmp_path,
        **{
            "model.scopes": '{"head.*": institution, "prompt.*": local}',
            "eval.personalized": "true",
        },
    )
    res = run(cfg, write=False)
    fed = build_federation(cfg)
    assert set(res.personalized) == {c.id for c in fed.clients if c.num_test > 0}
    for c in fed.clients:
        assert set(res.personalized[c.id]) == set(c.tasks)
        assert all(0.0 <= v <= 1.0 for v in res.personalized[c.id].values())
