"""House rules of the engine that a later change must not quietly break (issue 12)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "hierfed").rglob("*.py"), *(ROOT / "topologies").rglob("*.py")])
# the ledger's writer and the clock's cost questions: only the channel module asks them
MOVES = {"record", "transfer_s", "compute_s"}
CHANNEL = ROOT / "hierfed" / "engine" / "channel.py"


def _calls(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        (node.lineno, node.func.attr)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in MOVES
    ]


def _imports_clock(path: Path) -> bool:
    tree = ast.parse(path.read_text(), filename=str(path))
    return any(
        isinstance(node, ast.ImportFrom) and node.module == "hierfed.clock"
        for node in ast.walk(tree)
    )


def test_only_the_channel_module_writes_the_ledger_or_charges_the_clock():
    offenders = [
        f"{p.relative_to(ROOT)}:{line} .{name}()"
        for p in SOURCES
        if p != CHANNEL
        for line, name in _calls(p)
    ]
    offenders += [
        f"{p.relative_to(ROOT)} imports hierfed.clock"
        for p in SOURCES
        if p != CHANNEL and _imports_clock(p)
    ]
    assert offenders == [], "move these through hierfed.engine.channel: " + ", ".join(offenders)
    # the rule looks at the right calls: the channel module makes every one of them
    assert {name for _, name in _calls(CHANNEL)} == MOVES and _imports_clock(CHANNEL)


def test_no_module_outgrows_one_concept():
    long = {
        str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 420
    }
    assert long == {}, f"split these by concept (STYLE.md): {long}"


PROBE = """
import sys
import ray
from hierfed.config import load_config
from hierfed.errors import HierfedError
from hierfed.model.m3t import M3TModel
from hierfed.simulation import run
built = []
init = M3TModel.__init__
M3TModel.__init__ = lambda self, *a, **k: built.append(1) or init(self, *a, **k)
cfg = load_config(None, sys.argv[2:], topology=sys.argv[1])
try:
    run(cfg, write=False)
except HierfedError as exc:
    print("refused:", type(exc).__name__, exc)
print("ray started:", ray.is_initialized())
print("model built:", bool(built))
"""


@pytest.mark.parametrize(
    ("topology", "overrides", "key"),
    [
        ("hierarchical", ["topology.tiers.student.aggregator=median"], "student.aggregator"),
        (
            "hierarchical",
            ["topology.tiers.institution.aggregator=krum", "data.students_per_institution=3"],
            "institution.options.f",
        ),
        (
            "hierarchical",
            [
                "topology.tiers.institution.peer_steps=1",
                "topology.tiers.institution.peer_graph=random_regular",
                "data.num_institutions=3",
            ],
            "peer_graph",
        ),
        ("gossip", ["topology.options.graph=edges"], "topology.options"),
        ("gossip", ["topology.tiers.student.peer_steps=1"], "peer_steps"),
    ],
)
def test_a_bad_topology_setting_fails_before_any_worker_starts(topology, overrides, key):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, topology, "runtime.name=ray", *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused: ConfigError") and key in lines[0], out.stdout
    assert "ray started: False" in lines and "model built: False" in lines


def test_the_library_lists_no_benchmark_workloads():
    out = subprocess.run(
        [sys.executable, "-m", "hierfed", "list"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "edu-synth" in out.stdout
    assert "mlp-bench" not in out.stdout and " mlp" not in out.stdout


def test_benchmark_workloads_reach_ray_workers_through_the_plugins_key(ray_session):
    from benchmarks.mlp_bench import MLP_OVERRIDES
    from hierfed.config import load_config
    from hierfed.simulation import run
    from tests.conftest import tiny_overrides

    over = {**MLP_OVERRIDES, "runtime.name": "ray", "rounds": 1, "data.global_test_size": 50}
    res = run(load_config(None, tiny_overrides(**over)), write=False)
    assert res.metrics[-1]["participants"] == 9 and "label" in res.final_metrics


def test_an_unimportable_plugin_module_is_a_config_error():
    from hierfed.config import load_config
    from hierfed.errors import ConfigError

    with pytest.raises(ConfigError, match="plugins"):
        load_config(None, ["plugins=[no_such_module_here]"])


def test_an_inner_nodes_state_goes_to_a_worker_once_per_node_round():
    """Its update for the parent leaves with its last merge (no second trip just to emit),
    unless siblings mix between that merge and the emit."""
    from collections import Counter

    from hierfed.config import load_config
    from hierfed.ledger import CommLedger
    from hierfed.model.m3t import build_model, model_spec
    from hierfed.registry import TOPOLOGIES
    from hierfed.runtime.local import LocalRuntime
    from hierfed.runtime.worker import WorkerSetup
    from hierfed.simulation import build_federation
    from tests.conftest import play, tiny_overrides

    class Counting(LocalRuntime):
        trips: Counter = Counter()

        def merge(self, tasks, sources):
            Counting.trips.update(t.node_id for t in tasks)
            return super().merge(tasks, sources)

    def trips(**extra):
        over = {"runtime.name": "local", "topology.tiers.institution.local_rounds": 2, **extra}
        cfg = load_config(None, tiny_overrides(**over), topology="hierarchical")
        fed = build_federation(cfg)
        model = build_model(cfg.model, fed, cfg.seed)
        topo = TOPOLOGIES.get("hierarchical")(
            cfg=cfg, federation=fed, spec=model_spec(model, fed, cfg.model)
        )
        topo.init(model.component_state())
        rt = Counting(cfg.runtime)
        rt.start(WorkerSetup(cfg, fed))
        Counting.trips = Counter()
        play(topo, 1, rt, CommLedger())
        return {n: k for n, k in Counting.trips.items() if n.count("/") == 1}

    assert set(trips().values()) == {2}  # two node-rounds, two trips
    mixing = {
        "topology.tiers.institution.peer_steps": 1,
        "topology.tiers.institution.peer_graph": "complete",
    }
    assert set(trips(**mixing).values()) == {3}  # the emit follows the mixing
