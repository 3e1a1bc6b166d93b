"""The out-of-tree example plug-in package (examples/hierfed-plugin-example) registers through
entry points and runs: a topology, an aggregator and a dataset hierfed never imports."""

from __future__ import annotations

import importlib
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from hierfed.aggregators.base import AggContext
from hierfed.config import load_config
from hierfed.registry import AGGREGATORS, DATASETS, TOPOLOGIES
from hierfed.simulation import run
from hierfed.update import Update

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hierfed-plugin-example"
NAMES = {
    "hierfed.topologies": "example-star",
    "hierfed.aggregators": "example_damped_mean",
    "hierfed.datasets": "example-blobs",
}


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """Make the example discoverable the way ``pip install`` does — its sources importable and a
    dist-info folder whose entry_points.txt is written from the package's own pyproject.toml —
    without touching the virtualenv; the registries forget it afterwards."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = tmp_path / "hierfed_plugin_example-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, eps in project["entry-points"].items():
        lines += [f"[{group}]", *(f"{k} = {v}" for k, v in eps.items()), ""]
    (dist / "entry_points.txt").write_text("\n".join(lines))
    paths = [str(EXAMPLE / "src"), str(tmp_path)]
    for p in paths:
        monkeypatch.syspath_prepend(p)
    importlib.invalidate_caches()
    regs = (TOPOLOGIES, AGGREGATORS, DATASETS)
    before = [dict(r._items) for r in regs]
    for r in regs:
        r._loaded_entry_points = False  # look at the entry points again
    yield paths
    for r, items in zip(regs, before):
        r._items.clear()
        r._items.update(items)
        r._loaded_entry_points = False
    for mod in [m for m in sys.modules if m.startswith("hierfed_plugin_example")]:
        del sys.modules[mod]


def test_the_declared_entry_points_register_all_three_kinds(example_plugin):
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    assert {g: next(iter(eps)) for g, eps in project["entry-points"].items()} == NAMES
    assert TOPOLOGIES.get("example-star").__module__ == "hierfed_plugin_example.topology"
    assert "example_damped_mean" in AGGREGATORS.names()
    assert "example-blobs" in DATASETS.names()
    assert not str(EXAMPLE).startswith(str(Path(__file__).resolve().parents[1] / "hierfed"))


def test_the_damped_mean_by_hand(example_plugin):
    agg = AGGREGATORS.get("example_damped_mean")({"damping": 0.25})
    us = [
        Update.from_delta({"head.t": {"w": torch.tensor([x])}}, w, sender=s, round=0)
        for s, x, w in [("a", 4.0, 1.0), ("b", 0.0, 3.0)]
    ]
    merged, _ = agg.aggregate(us, None, AggContext("hub", "hub", 0, 0))
    assert merged.mean()["head.t"]["w"].item() == pytest.approx(
        0.75 * 1.0
    )  # 0.75 * (4*1 + 0*3) / 4


def test_cli_list_shows_the_example(example_plugin, capsys):
    from hierfed.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES.values():
        assert name in out


def test_a_run_uses_the_plugin_topology_aggregator_and_dataset(example_plugin):
    over = {
        "data.name": "example-blobs",
        "data.num_institutions": 3,
        "data.students_per_institution": 2,
        "data.samples_per_student": 24,
        "data.global_test_size": 60,
        "data.essay_only_institutions": 0,
        "model.d_model": 16,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "rounds": 2,
        "topology.tiers.hub.aggregator": "example_damped_mean",
        "topology.tiers.hub.options.damping": 0.1,
        "runtime.name": "local",
        "eval.personalized": False,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()], topology="example-star")
    res = run(cfg, write=False)
    assert res.federation_summary["dataset"] == "example-blobs"
    assert set(res.ledger.by_edge()) == {"hub->student", "student->hub"}
    assert res.final_metrics["blob"] > res.initial_metrics["blob"]
