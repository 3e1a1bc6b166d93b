"""The benchmark harness: suite parsing, time-to-target from hand-written metrics, a real tiny suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import build, read_tidy, tidy_rows
from benchmarks.suite import load_suite
from hierfed.errors import ConfigError

SUITE = """
name: t
seeds: [0, 1]
target: {metric: mean, value: 0.5}
runtime: local
base: {rounds: 2, train: {lr: 0.1}}
configurations:
  - {name: a, topology: star}
  - {name: b, topology: hierarchical, overrides: {topology.tiers.institution.local_rounds: 2}}
"""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_suite_overrides_flatten_nested_keys_and_add_seed_and_runtime(tmp_path):
    suite = load_suite(_write(tmp_path / "s.yaml", SUITE))
    ov = suite.overrides(suite.entries[1], 1)
    assert ov == [
        "rounds=2",
        "train.lr=0.1",
        "topology.tiers.institution.local_rounds=2",
        "seed=1",
        "runtime.name=local",
    ]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seeds: []\nconfigurations: [{name: a, topology: star}]", "suite.seeds"),
        ("seedz: [0]\nconfigurations: [{name: a, topology: star}]", "suite.seedz"),
        ("configurations: [{name: a}]", "suite.configurations[0]"),
        (
            "configurations: [{name: a, topology: star}, {name: a, topology: star}]",
            "suite.configurations[1].name",
        ),
        ("runtime: gpu\nconfigurations: [{name: a, topology: star}]", "suite.runtime"),
    ],
)
def test_bad_suites_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_suite(_write(tmp_path / "s.yaml", text))
    assert err.value.key == key


def _metrics(rounds: list[tuple[float, dict[str, int], float]]) -> str:
    lines = [json.dumps({"round": 0, "global": {"x": 0.1, "y": 0.1}, "bytes": {}, "wall_s": 0.0})]
    for i, (m, b, sim) in enumerate(rounds, start=1):
        lines.append(
            json.dumps(
                {
                    "round": i,
                    "global": {"x": m, "y": m},
                    "bytes": b,
                    "bytes_total": sum(b.values()),
                    "sim_time_s": sim,
                    "wall_s": 1.0,
                }
            )
        )
    return "\n".join(lines) + "\n"


def test_time_to_target_is_the_first_round_reaching_it(tmp_path):
    out = tmp_path / "res"
    (out / "metrics").mkdir(parents=True)
    _write(out / "suite.yaml", SUITE)
    status = [
        {
            "config": "b",
            "topology": "hierarchical",
            "seed": s,
            "status": "ok",
            "wall_s": 2.0,
            "rounds": 3,
        }
        for s in (0, 1)
    ]
    _write(out / "status.json", json.dumps(status))
    up = {"student->institution": 100, "institution->global": 10, "global->institution": 10}
    # seed 0 reaches 0.5 in round 2; seed 1 in round 3
    _write(
        out / "metrics" / "b__seed0.jsonl",
        _metrics([(0.3, up, 1.0), (0.6, up, 2.0), (0.7, up, 1.5)]),
    )
    _write(
        out / "metrics" / "b__seed1.jsonl",
        _metrics([(0.3, up, 1.0), (0.4, up, 1.0), (0.5, up, 1.0)]),
    )
    build(out)
    rows = read_tidy(out / "tidy.csv")
    r2 = next(r for r in rows if r["seed"] == 0 and r["round"] == 2)
    assert (r2["bytes_top"], r2["bytes_total"], r2["sim_time_s"]) == (40.0, 240.0, 3.0)
    report = (out / "REPORT.md").read_text()
    # rounds to target: mean(2, 3) = 2.5, std 0.71; top-link bytes 40 and 60, total 240 and 360, simulated time 3 and 3
    assert "| b | 2/2 | 2.5 ± 0.71 | 50 ± 14 | 300 ± 85 | 3 ± 0 |" in report
    assert all(
        (out / f).read_bytes()[:4] == b"\x89PNG"
        for f in ("metric_vs_round.png", "metric_vs_sim_time.png")
    )
    # rebuilding from tidy.csv alone (no per-run metrics) gives the same table
    for f in (out / "metrics").iterdir():
        f.unlink()
    build(out)
    assert (
        "| b | 2/2 | 2.5 ± 0.71 | 50 ± 14 | 300 ± 85 | 3 ± 0 |" in (out / "REPORT.md").read_text()
    )


def test_serverless_runs_have_no_top_link(tmp_path):
    out = tmp_path / "res"
    (out / "metrics").mkdir(parents=True)
    _write(
        out / "status.json",
        json.dumps([{"config": "g", "topology": "gossip", "seed": 0, "status": "ok"}]),
    )
    _write(out / "metrics" / "g__seed0.jsonl", _metrics([(0.3, {"student<->student": 50}, 1.0)]))
    rows = tidy_rows(out, "mean")
    assert all(r["bytes_top"] != r["bytes_top"] for r in rows)  # NaN: not zero, absent
    assert rows[-1]["bytes_total"] == 50


def test_a_real_tiny_suite_runs_and_skips_an_unknown_topology(tmp_path):
    from benchmarks.runner import run_suite
    from tests.conftest import tiny_overrides

    base = "\n".join(
        f"  {o.split('=', 1)[0]}: {o.split('=', 1)[1]}" for o in tiny_overrides(rounds=1)
    )
    text = (
        f"name: tiny\nseeds: [0]\ntarget: {{metric: mean, value: 0.3}}\nruntime: local\nbase:\n{base}\n"
        "configurations:\n  - {name: star, topology: star}\n  - {name: nope, topology: no-such-topology}\n"
    )
    out = run_suite(_write(tmp_path / "tiny.yaml", text), tmp_path / "res", tensorboard=True)
    status = {s["config"]: s for s in json.loads((out / "status.json").read_text())}
    assert status["star"]["status"] == "ok"
    assert list((out / "runs" / "star" / "seed-0" / "tensorboard").glob("events.out.tfevents.*"))
    assert status["nope"]["status"] == "skipped" and "not registered" in status["nope"]["reason"]
    rows = read_tidy(out / "tidy.csv")
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["bytes_top"] > 0
    assert "nope" in (out / "REPORT.md").read_text()
