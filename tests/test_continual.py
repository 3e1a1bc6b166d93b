"""Continual federated learning: the metrics on hand-computed matrices, components that exist
only from their arrival (no bytes before), a late joiner starting from the current global
state, resume in the middle of a schedule, bad schedules refused, and mitigations that act."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from hierfed import plugins  # noqa: F401  (registers the built-in plug-ins)
from hierfed.cli import main
from hierfed.config import load_config
from hierfed.continual.fit import ContinualFit
from hierfed.continual.metrics import aggregation_forgetting, summarize
from hierfed.continual.report import continual_tables
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.registry import TOPOLOGIES
from hierfed.runtime.base import make_runtime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation, run
from tests.conftest import play, tiny_overrides

# ---------------------------------------------------------------- metrics, by hand


def test_metrics_of_a_three_stage_matrix_by_hand():
    # tasks a, b, c arrive in stages 0, 1, 2; baseline (random init) 0.1, 0.2, 0.3
    m = [
        [0.8, 0.25, 0.35],
        [0.6, 0.9, 0.40],
        [0.5, 0.7, 0.95],
    ]
    s = summarize(m, stage=[0, 1, 2], baseline=[0.1, 0.2, 0.3])
    assert s["acc"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # BWT: (R[2][a] - R[0][a] + R[2][b] - R[1][b]) / 2 = (-0.3 - 0.2) / 2
    assert s["bwt"] == pytest.approx(-0.25)
    # FWT: (R[0][b] - b_b + R[1][c] - b_c) / 2 = (0.05 + 0.10) / 2
    assert s["fwt"] == pytest.approx(0.075)
    # forgetting: a: max(0.8, 0.6) - 0.5 = 0.3; b: max(0.25, 0.9) - 0.7 = 0.2
    assert s["f"] == pytest.approx({0: 0.3, 1: 0.2})
    assert s["forgetting"] == pytest.approx(0.25)


def test_metrics_with_two_tasks_in_a_stage_and_gaps():
    # a and b arrive together (stage 0), c in stage 1; c was not evaluated before its stage
    m = [[0.7, 0.6, None], [0.65, 0.7, 0.9]]
    s = summarize(m, stage=[0, 0, 1], baseline=[0.1, 0.1, 0.2])
    assert s["bwt"] == pytest.approx(((0.65 - 0.7) + (0.7 - 0.6)) / 2)
    assert s["forgetting"] == pytest.approx((0.05 + (-0.1)) / 2)
    assert s["fwt"] is None  # R[0][c] missing: no term
    one = summarize([[0.4, 0.5]], stage=[0, 0])
    assert one["acc"] == pytest.approx(0.45) and one["bwt"] is None and one["forgetting"] is None


def test_aggregation_forgetting_is_local_minus_merged():
    out = aggregation_forgetting(
        {"a": {"t1": 0.9, "t2": 0.5}, "b": {"t1": 0.4}},
        {"a": {"t1": 0.7, "t2": 0.6}, "b": {"t1": 0.4}},
    )
    assert out["per_client"] == pytest.approx({"a": 0.05, "b": 0.0})
    assert out["mean"] == pytest.approx(0.025)


# ---------------------------------------------------------------- the schedule in the engine


def _cfg(tmp_path, **extra):
    return load_config(
        None,
        tiny_overrides(**{"runtime.name": "local", **extra}),
        topology="hierarchical",
        out=str(tmp_path / "run"),
    )


def _play(cfg, rounds, spy=None):
    """Run ``rounds`` rounds by hand; ``spy(round, jobs, states)`` sees every training call."""
    fed = build_federation(cfg)
    rt = make_runtime(cfg.runtime)
    rt.start(WorkerSetup(cfg, fed))
    spec, initial = rt.model_info()
    topo = TOPOLOGIES.get(cfg.topology.name)(cfg=cfg, federation=fed, spec=spec)
    topo.init(initial)
    ledger = CommLedger()
    if spy is not None:
        train = rt.train

        def spying(jobs, states):
            spy(jobs, states, topo)
            return train(jobs, states)

        rt.train = spying  # type: ignore[method-assign]
    after = []
    try:
        for r in range(1, rounds + 1):
            play(topo, r, rt, ledger)
            after.append({c: dict(v) for c, v in topo.engine.states.items()})
    finally:
        rt.shutdown()
    return topo, ledger, initial, after


def test_a_scheduled_task_or_modality_has_no_component_and_costs_no_bytes_before_it_arrives(
    tmp_path,
):
    cfg = _cfg(
        tmp_path,
        rounds=3,
        **{"continual.tasks": "{essay_topic: 3}", "continual.modalities": "{image: 2}"},
    )
    seen = {}

    def spy(jobs, states, topo):
        seen.setdefault(jobs[0].round, topo.global_state())

    topo, ledger, initial, after = _play(cfg, 3, spy)
    late = {"head.essay_topic", "prompt.essay_topic"}
    for nid, st in after[0].items():
        assert not late & set(st) and "encoder.image" not in st, nid
    assert "encoder.image" in after[1]["global"] and not late & set(after[1]["global"])
    assert late <= set(after[2]["global"])
    by_round: dict[int, set[str]] = {1: set(), 2: set(), 3: set()}
    for rec in ledger.records:
        by_round[rec.round].add(rec.component)
    assert not (late | {"encoder.image", "head.digit"}) & by_round[1]
    assert "encoder.image" in by_round[2] and not late & by_round[2]
    assert late <= by_round[3]
    # the global model evaluates a task not yet arrived with its initial components
    g = seen[2]
    assert torch.equal(g["head.essay_topic"]["weight"], initial["head.essay_topic"]["weight"])
    img = "encoder.image"
    assert not torch.equal(seen[3][img]["proj.weight"], initial[img]["proj.weight"])


def test_a_late_joining_institution_starts_from_the_current_global_state(tmp_path):
    cfg = _cfg(tmp_path, rounds=2, **{"continual.join": "{global/inst-02: 2}"})
    seen = {}

    def spy(jobs, states, topo):
        r = jobs[0].round
        seen[r] = {j.client_id for j in jobs}
        if r == 2:
            seen["start"] = {k: dict(v) for k, v in states.items()}

    topo, ledger, _, after = _play(cfg, 2, spy)
    assert not any(c.startswith("global/inst-02") for c in seen[1])
    assert {c for c in seen[2] if c.startswith("global/inst-02")} == {
        f"global/inst-02/student-00{i}" for i in range(3)
    }
    assert not any("inst-02" in (t.src + t.dst) for t in ledger.records if t.round == 1)
    start = seen["start"]["global/inst-02"]
    for c, v in start.items():  # every global component as the root had it after round 1
        for p in v:
            assert torch.equal(v[p], after[0]["global"][c][p]), c


def _digest(out):
    state = hashlib.sha256((out / "final_state.safetensors").read_bytes()).hexdigest()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("wall_s", None)
    return state, metrics, json.loads((out / "continual.json").read_text())


def test_resume_in_the_middle_of_a_schedule_is_bit_identical(tmp_path):
    over = {
        "rounds": 4,
        "checkpoint.keep": 4,
        "continual.tasks": "{essay_grade: [1, 3], essay_topic: 3}",
        "continual.join": "{global/inst-01: 2}",
        "continual.ewc": 5.0,
        "continual.replay": True,
        "continual.memory": 4,
    }
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(**{"runtime.name": "local", **over}), out=str(out))
    run(cfg)
    reference = _digest(out)
    cont = reference[2]
    assert len(cont["global"]["matrix"]) == 2 and cont["tasks"][-1] == "essay_topic"
    assert sorted(cont["tier"]) == ["global/inst-00", "global/inst-01", "global/inst-02"]
    assert len(cont["client"]) == 9
    assert all(cont["tier"][n]["fwt"] is not None for n in cont["tier"])  # b_j per tier node
    probed = cont["aggregation"]["by_stage"]["1"]["per_client"]  # stage 1 ends with round 4
    assert probed and all(c.startswith("global/inst-") for c in probed)
    ck = out / "checkpoints"  # as if the driver died after round 3 (the EWC anchor is taken)
    shutil.rmtree(ck / "round-0004")
    (ck / "LATEST").write_text("round-0003\n")
    for f in ("final_state.safetensors", "metrics.jsonl", "continual.json"):
        (out / f).unlink()
    run(load_config(out / "config.yaml", out=str(out)), resume=True)
    assert _digest(out) == reference
    summary = json.loads((out / "summary.json").read_text())["continual"]
    assert summary["acc"] == pytest.approx(reference[2]["global"]["acc"])
    # the report command's tables and plot
    assert main(["report", str(out)]) == 0
    assert (out / "continual.png").stat().st_size > 0
    tables = continual_tables(out)
    assert tables[0].row_count == 1 + 2  # random init + one row per stage


def test_freeze_old_stops_training_and_sending_old_heads(tmp_path):
    cfg = _cfg(
        tmp_path, rounds=2, **{"continual.tasks": "{essay_topic: 2}", "continual.freeze_old": True}
    )
    trains = {}

    def spy(jobs, states, topo):
        trains[jobs[0].round] = {j.client_id: set(j.trains) for j in jobs}

    _, ledger, _, _ = _play(cfg, 2, spy)
    old = {"head.essay_grade", "prompt.essay_grade"}
    cid = "global/inst-02/student-000"
    assert old <= trains[1][cid] and not old & trains[2][cid]
    assert "head.essay_topic" in trains[2][cid]
    up2 = {t.component for t in ledger.records if t.round == 2 and t.edge.startswith("student")}
    assert not old & up2 and "adapter.backbone" in up2


def test_old_scope_keeps_old_heads_per_institution_once_a_new_task_arrives(tmp_path):
    over = {"continual.tasks": "{essay_topic: 2}", "continual.old_scope": "institution"}
    _, ledger, _, after = _play(_cfg(tmp_path, rounds=2, **over), 2)
    head = "head.essay_grade"
    up = {
        r: {t.component for t in ledger.records if t.round == r and t.edge == e}
        for r, e in ((1, "institution->global"), (2, "institution->global"))
    }
    assert head in up[1] and head not in up[2] and "head.essay_topic" in up[2]
    assert any(
        t.component == head
        for t in ledger.records
        if t.round == 2 and t.edge == "student->institution"
    )
    root, inst = after[1]["global"][head], after[1]["global/inst-00"][head]
    assert all(torch.equal(root[k], after[0]["global"][head][k]) for k in root)  # not merged up
    assert not all(torch.equal(root[k], inst[k]) for k in root)  # moved on in its institution


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        ({"continual.tasks": "{essay_topics: 2}"}, "continual.tasks.essay_topics", "known:"),
        ({"continual.modalities": "{video: 2}"}, "continual.modalities.video", "known:"),
        ({"continual.join": "{global/inst-09: 2}"}, "continual.join.global/inst-09", "tier paths"),
        ({"continual.tasks": "{essay_topic: 7}"}, "continual.tasks.essay_topic", "1..rounds"),
        (
            {"continual.tasks": "{essay_topic: [1, 3, 5, 7]}"},
            "continual.tasks.essay_topic",
            "returns",
        ),
        ({"continual.tasks": "{essay_topic: [3, 2]}"}, "continual.tasks.essay_topic", "N < M"),
        (
            {"continual.leave": "{global/inst-00: 1}", "continual.join": "{global/inst-00: 2}"},
            "continual.leave.global/inst-00",
            "after join",
        ),
        ({"continual.ewc": 1.0, "continual.tasks": "{essay_topic: 2}"}, "continual.ewc", "[N, M]"),
        ({"continual.old_scope": "student_group"}, "continual.old_scope", "below the root"),
        (
            {
                "continual.tasks": "{essay_grade: [1, 2], essay_topic: [1, 2], digit: [1, 2], "
                "dropout_risk: [1, 2]}"
            },
            "continual",
            "round 2",
        ),
    ],
)
def test_bad_schedules_are_refused_in_one_line_before_any_work(tmp_path, extra, key, says):
    with pytest.raises(ConfigError) as err:
        run(_cfg(tmp_path, rounds=3, **extra), write=False, runtime=_NoRuntime())
    msg = str(err.value)
    assert "\n" not in msg and key in msg and says in msg, msg


class _NoRuntime:
    """Any call means the run got past its checks: the test fails."""

    def __getattr__(self, name):
        raise AssertionError(f"runtime.{name} called before the schedule was checked")


def test_gossip_refuses_a_schedule(tmp_path):
    cfg = load_config(
        None,
        tiny_overrides(**{"runtime.name": "local", "continual.tasks": "{essay_topic: 2}"}),
        topology="gossip",
    )
    with pytest.raises(ConfigError, match="tree topologies"):
        run(cfg, write=False, runtime=_NoRuntime())


# ---------------------------------------------------------------- mitigations


def _trainer(tmp_path):
    from hierfed.client import ClientTrainer
    from hierfed.model.m3t import build_model

    cfg = _cfg(tmp_path)
    fed = build_federation(cfg)
    model = build_model(cfg.model, fed, cfg.seed)
    return ClientTrainer(model, cfg.train, cfg.seed), fed, model.component_state()


def test_ewc_pulls_shared_components_toward_the_anchor(tmp_path):
    trainer, fed, start = _trainer(tmp_path)
    cid = fed.clients[0].id
    data = fed.train[cid]
    trains = ("adapter.backbone", "encoder.tabular", "head.dropout_risk", "prompt.dropout_risk")
    anchor = {c: start[c] for c in ("adapter.backbone", "encoder.tabular")}

    def drift(lam):
        trainer.continual = ContinualFit(
            cid, tasks=("dropout_risk",), old=("essay_grade",), memory=8, ewc=lam, anchor=anchor
        )
        fit = trainer.fit(data=data, tasks=(), start=start, trainable=trains, key=(1, 0, cid))
        trainer.continual = None
        a = anchor["adapter.backbone"]
        return sum(float(((fit.state["adapter.backbone"][k] - a[k]) ** 2).sum()) for k in a)

    free, some, pulled = drift(0.0), drift(10.0), drift(1e3)
    assert pulled < some < free and pulled < 0.5 * free, (free, some, pulled)


def test_replay_trains_old_tasks_on_the_memory_rows_only(tmp_path):
    trainer, fed, _ = _trainer(tmp_path)
    cf = ContinualFit(
        "global/inst-00/student-000", ("digit",), old=("essay_grade",), memory=5, replay=True
    )
    tasks, rows = cf.plan(seed=0, n=33)
    assert tasks == ("digit", "essay_grade") and len(rows["essay_grade"]) == 5
    assert (rows["essay_grade"] == cf.plan(seed=0, n=33)[1]["essay_grade"]).all()  # fixed memory
    batches = trainer.schedule(fed.train[cf.client_id], tasks, (1, 0), rows)
    used = {int(i) for t, idx in batches if t == "essay_grade" for i in idx}
    assert used == {int(i) for i in rows["essay_grade"]}
    assert sum(len(idx) for t, idx in batches if t == "digit") == 33


def test_ray_actors_give_the_local_runtimes_result(ray_session, tmp_path):
    """Continual jobs (tasks, replay memory, EWC anchor) and the stage-end probe travel to Ray
    actors and back: two workers end bit-identical to the in-process runtime."""
    over = {
        "rounds": 3,
        "data.num_institutions": 2,
        "continual.tasks": "{essay_grade: [1, 3], essay_topic: 3}",
        "continual.ewc": 10.0,
        "continual.replay": True,
        "continual.memory": 4,
    }
    outs = {}
    for name, rt in (("ray", {"runtime.name": "ray", "runtime.num_workers": 2}), ("local", {})):
        out = tmp_path / name
        run(
            load_config(
                None, tiny_overrides(**{"runtime.name": "local", **over, **rt}), out=str(out)
            )
        )
        outs[name] = _digest(out)
    assert outs["ray"][0] == outs["local"][0] and outs["ray"][2] == outs["local"][2]
    assert outs["ray"][2]["aggregation"]["by_stage"]["1"]["per_client"]
