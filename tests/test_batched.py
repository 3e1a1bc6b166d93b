"""Batched cohort training (hierfed/batched) gives every client the result it gets alone.

Bit for bit on the CPU: the trained tensors, the reported loss and the step count of each
client, for the benchmark MLP (uneven sizes, every optimizer, FedProx, clipping), the tiny
M3T with missing modalities, personalization and data poisoning, LoRA clients of ranks 1, 2
and 4, and two whole pinned runs (tests/test_engine_pinned.py) trained batched.
"""

from __future__ import annotations

import pytest
import torch

from hierfed.batched.trainer import CohortItem, CohortTrainer, cohort_groups
from hierfed.client import ClientTrainer
from hierfed.config import load_config
from hierfed.data.federation import ClientData
from hierfed.errors import ConfigError
from hierfed.runtime.jobs import TrainJob
from hierfed.runtime.worker import WorkerCore, WorkerSetup
from hierfed.simulation import build_federation
from tests.conftest import tiny_overrides


def _same_fit(a, b) -> None:
    assert (a.steps, a.loss) == (b.steps, b.loss)
    assert a.state.keys() == b.state.keys()
    for c in a.state:
        for k in a.state[c]:
            assert torch.equal(a.state[c][k], b.state[c][k]), (c, k)


def _same_results(x, y) -> None:
    (ma, ua), (mb, ub) = x, y
    assert [(m.client_id, m.num_samples, m.loss, m.steps, m.sizes, m.error) for m in ma] == [
        (m.client_id, m.num_samples, m.loss, m.steps, m.sizes, m.error) for m in mb
    ]
    for m, n in zip(ma, mb):
        assert (m.local is None) == (n.local is None)
        for c in m.local or {}:
            for k in m.local[c]:
                assert torch.equal(m.local[c][k], n.local[c][k])
    assert ua.keys() == ub.keys()
    for cid in ua:
        assert ua[cid].weights == ub[cid].weights
        for c, params in ua[cid].tensors.items():
            for k, t in params.items():
                assert torch.equal(t, ub[cid].tensors[c][k]), (cid, c, k)


@pytest.mark.parametrize(
    "extra",
    [
        [],  # plain SGD: the overhead benchmark's workload
        ["train.optimizer=adam", "train.fedprox_mu=0.1", "train.max_grad_norm=0.5"],
        ["train.momentum=0.9", "train.weight_decay=0.01", "train.local_epochs=1"],
    ],
)
def test_mlp_clients_of_uneven_sizes_train_bit_identically(extra):
    from benchmarks.overhead.workload import Workload, build, workload_config

    cfg = workload_config(
        Workload(6, 1.0), runtime="local", extra=["data.samples_per_student=40", *extra]
    )
    fed, model, comps = build(cfg)
    trainer = ClientTrainer(model, cfg.train, cfg.seed)
    start = model.component_state()
    # 40, 37, ..., 25 rows: different step counts, and last batches of 2 to 32 rows (those
    # under 4 rows step one by one: the batched kernel sums them in another order)
    sizes = [40 - 3 * i for i in range(len(fed.clients))]
    items = []
    for c, n in zip(fed.clients, sizes):
        d = fed.train[c.id]
        data = ClientData(
            {m: v[:n] for m, v in d.inputs.items()}, {t: v[:n] for t, v in d.labels.items()}
        )
        items.append(CohortItem(data, ("label",), start, tuple(comps), (1, 0, c.id)))
    alone = [
        trainer.fit(data=it.data, tasks=it.tasks, start=start, trainable=comps, key=it.key)
        for it in items
    ]
    together = CohortTrainer(trainer).fit_group(items)
    for a, b in zip(alone, together):
        _same_fit(a, b)
    assert len({a.steps for a in alone}) > 1  # the cohort really was uneven
    assert alone[0].state["head.label"]["weight"].ne(start["head.label"]["weight"]).any()


def _jobs(core, fed, *, personal: bool = False):
    jobs = []
    for i, c in enumerate(fed.clients):
        holds = core.spec.holds(c)
        sends = tuple(x for x in holds if not (personal and i % 2 and x.startswith("head.")))
        jobs.append(TrainJob(c.id, "global", "global", 1, (1, 0, c.id), trains=holds, sends=sends))
    return jobs


def _both(core, jobs, states):
    core.batched = False
    alone = core.train(jobs, states)
    core.batched = True
    return alone, core.train(jobs, states)


def test_tiny_m3t_with_missing_modalities_personalization_and_poisoning(tiny_cfg):
    cfg = tiny_cfg(
        **{
            "runtime.name": "local",
            "attack.name": "label_flip",
            "attack.fraction": 0.4,
            "data.samples_per_student": 20,
        }
    )
    fed = build_federation(cfg)
    core = WorkerCore(WorkerSetup(cfg, fed))
    assert len({c.modalities for c in fed.clients}) > 1  # some clients lack a modality
    jobs = _jobs(core, fed, personal=True)
    alone, together = _both(core, jobs, {"global": core.initial_state()})
    _same_results(alone, together)
    assert any(m.local for m in together[0])  # personal heads stayed home


def test_dp_sgd_clients_train_one_at_a_time_beside_a_batched_cohort(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(
        **{
            "runtime.name": "local",
            "privacy.policies.p.epsilon": 8.0,
            "privacy.assign": '{"global/inst-00/*": p}',
            "data.samples_per_student": 8,
            "train.batch_size": 8,
        }
    )
    fed = build_federation(cfg)
    core = WorkerCore(WorkerSetup(cfg, fed))
    sizes: list[int] = []
    fit_group = CohortTrainer.fit_group

    def counted(self, items):
        sizes.append(len(items))
        return fit_group(self, items)

    monkeypatch.setattr(CohortTrainer, "fit_group", counted)
    jobs = _jobs(core, fed)
    alone, together = _both(core, jobs, {"global": core.initial_state()})
    _same_results(alone, together)
    private = [m for m in together[0] if m.privacy is not None]
    assert [m.client_id for m in private] == [c.id for c in fed.clients[:3]]
    assert [m.privacy for m in private] == [m.privacy for m in alone[0][:3]]
    assert sum(sizes) == len(fed.clients) - 3  # the others trained batched


def test_lora_clients_of_ranks_1_2_4_train_bit_identically():
    from tests.test_lora_ranks import _core, _parent

    core, fed = _core()
    jobs = _jobs(core, fed)
    alone, together = _both(core, jobs, {"global": _parent(core)})
    _same_results(alone, together)
    assert {core.spec.rank_of(c) for c in fed.clients} == {1, 2, 4}


def test_a_client_that_raises_is_reported_alone_and_a_failed_batch_reruns(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(**{"runtime.name": "local"})
    fed = build_federation(cfg)
    bad = fed.clients[1].id
    core = WorkerCore(WorkerSetup(cfg, fed))
    jobs = _jobs(core, fed)
    states = {"global": core.initial_state()}
    alone, _ = _both(core, jobs, states)
    core.faults = type(core.faults)([f"raise:{bad}"])
    metas, updates = core.train(jobs, states)
    assert [m.client_id for m in metas if m.error] == [bad]
    assert (metas[1].error or "").startswith("InjectedFault: injected fault in client")
    ok = [m for m in alone[0] if m.client_id != bad]
    assert [(m.client_id, m.loss) for m in ok] == [
        (m.client_id, m.loss) for m in metas if m.client_id != bad
    ]
    # a batched fit that raises: its clients train again one at a time, same results
    core.faults = type(core.faults)([])

    def boom(self, items):
        raise RuntimeError("no batching today")

    monkeypatch.setattr(CohortTrainer, "fit_group", boom)
    _same_results(alone, core.train(jobs, states))


def test_groups_are_cut_by_signature_in_order_and_size():
    def item(trains, tasks):
        return CohortItem(ClientData({}, {}), tasks, {"a": {"w": torch.zeros(1)}}, trains, ())

    items = [item(("a",), ("t",)), item(("a",), ("u",)), item(("a",), ("t",)), item(("a",), ("t",))]
    assert cohort_groups(items, 2) == [[0, 2], [3], [1]]


def test_batched_key_is_checked_and_on_refuses_dp_sgd():
    with pytest.raises(ConfigError, match="train.batched"):
        load_config(None, tiny_overrides(**{"train.batched": "sometimes"}))
    with pytest.raises(ConfigError, match=r"privacy.policies.*train.batched=auto"):
        load_config(
            None,
            tiny_overrides(
                **{
                    "train.batched": "on",
                    "privacy.policies.p.epsilon": 8.0,
                    "privacy.default": "p",
                }
            ),
        )
    with pytest.raises(ConfigError, match="model.lora_dropout"):
        load_config(None, tiny_overrides(**{"train.batched": "on", "model.lora_dropout": 0.1}))


def test_whole_runs_trained_batched_keep_the_pinned_digests(monkeypatch):
    """Two pinned runs (tests/test_engine_pinned.py, recorded one client at a time) trained
    with ``train.batched=on``: final state, ledger and clock digests unchanged."""
    import tests.test_engine_pinned as pinned
    from hierfed.batched import trainer

    real = pinned._overrides
    sizes: list[int] = []
    fit_group = trainer.CohortTrainer.fit_group

    def on(name):
        path, topo, ov = real(name)
        return path, topo, [*ov, "train.batched=on"]

    def counted(self, items):
        sizes.append(len(items))
        return fit_group(self, items)

    monkeypatch.setattr(pinned, "_overrides", on)
    monkeypatch.setattr(trainer.CohortTrainer, "fit_group", counted)
    for name in ("star", "robust-median"):
        assert pinned.digest(name) == pinned.PINNED[name]
    assert sizes and max(sizes) > 1  # they really trained batched


def test_auto_batches_single_task_small_models_on_the_cpu_and_everything_on_a_gpu(tiny_cfg):
    from hierfed.batched.support import use_batched
    from hierfed.model.spec import ModelSpec

    cfg = tiny_cfg()
    small = ModelSpec(components={}, tier_names=(), resources={}, backbone_numel=1_000)
    big = ModelSpec(components={}, tier_names=(), resources={}, backbone_numel=22_000_000)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert use_batched(cfg, cpu, small, 1) and not use_batched(cfg, cpu, small, 4)
    assert not use_batched(cfg, cpu, big, 1) and use_batched(cfg, gpu, big, 4)
    off = tiny_cfg(**{"train.batched": "off"})
    assert not use_batched(off, gpu, small, 1)


def test_batched_on_two_ray_workers_keeps_the_pinned_digest(ray_session, monkeypatch):
    """The pinned star run (recorded one at a time, local runtime) trained batched by two Ray
    workers, one slice of 4-5 clients each: the same digest."""
    import tests.test_engine_pinned as pinned

    real = pinned._overrides
    extra = ["train.batched=on", "runtime.name=ray", "runtime.num_workers=2"]
    extra.append("runtime.chunks_per_worker=1")
    monkeypatch.setattr(
        pinned, "_overrides", lambda n: (lambda a: (*a[:2], [*a[2], *extra]))(real(n))
    )
    assert pinned.digest("star") == pinned.PINNED["star"]


def test_on_refuses_a_continual_schedule_which_trains_one_at_a_time():
    with pytest.raises(ConfigError, match=r"continual.*train.batched=auto"):
        load_config(
            None,
            tiny_overrides(**{"train.batched": "on", "continual.tasks": "{essay_topic: 2}"}),
        )
    cfg = load_config(None, tiny_overrides(**{"continual.tasks": "{essay_topic: 2}"}))
    assert cfg.train.batched == "auto"  # auto: continual jobs go one at a time in the worker
