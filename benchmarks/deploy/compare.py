"""A deployed run against the simulated one, same config and seed: wall time and bytes.

    python -m benchmarks.deploy.compare [--out benchmarks/results/deploy] [--rewrite]

On this machine it starts a real ``flower-superlink`` and one ``flower-supernode`` per
institution (TLS, SuperNode authentication; ``hierfed.deploy.localhost``), runs the config
three ways — simulated (in-process, ``runtime.name=local``), deployed, deployed with SecAgg+ —
and records per way: wall time (the run, as its ``summary.json`` measures it, and the whole
launch), the ledger's bytes per edge, what Flower carried (state and reply payloads, and
SecAgg+'s protocol records), and whether the final state equals the simulated one.
``--rewrite`` rebuilds REPORT.md from results.json without running.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, provenance, shared_cpu_note

CONFIG = """rounds: 3
data: {num_institutions: 2, students_per_institution: 4, samples_per_student: 40,
       global_test_size: 120, essay_only_institutions: 1}
model: {d_model: 32, num_layers: 1, num_heads: 2, prompt_tokens: 2}
eval: {personalized: false, equity: false}
runtime: {name: local}
deployment: {connect_timeout_s: 120, round_timeout_s: 300}
"""
INSTS = ["global/inst-00", "global/inst-01"]


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[c][p] - b[c][p]).abs().max()) for c in a for p in a[c])


def measure(root: Path) -> dict[str, Any]:
    from hierfed.checkpoint import load_state
    from hierfed.deploy.localhost import Localhost
    from hierfed.ledger import CommLedger
    from hierfed.simulation import run

    site = Localhost.from_yaml(root, CONFIG, ["inst-00", "inst-01"])
    out: dict[str, Any] = {"config": CONFIG}
    t0 = time.perf_counter()
    sim = run(replace(site.cfg, out=str(root / "sim")))
    sim_summary = json.loads((root / "sim" / "summary.json").read_text())
    out["simulated"] = {
        "launch_s": time.perf_counter() - t0,
        "run_s": sim_summary["total_s"],
        "bytes_by_edge": sim.ledger.by_edge(),
    }
    try:
        t0 = time.perf_counter()
        site.up(INSTS)
        out["startup_s"] = time.perf_counter() - t0
        for name, secagg in (("deployed", False), ("deployed_secagg", True)):
            cfg = replace(
                site.cfg,
                out=str(root / name),
                deployment=replace(site.cfg.deployment, secagg=secagg),
            )
            t0 = time.perf_counter()
            rc = site.launch(cfg)
            launch_s = time.perf_counter() - t0
            info = json.loads((root / name / "deployment.json").read_text())
            summary = json.loads((root / name / "summary.json").read_text())
            state, _ = load_state(root / name / "final_state")
            out[name] = {
                "exit_code": rc,
                "launch_s": launch_s,
                "run_s": summary["total_s"],
                "server_wall_s": info["wall_s"],
                "top_edge_ledger": CommLedger.load(root / name / "ledger.csv").by_edge(),
                "top_edge_by_component_secagg": {
                    k: v
                    for k, v in CommLedger.load(root / name / "ledger.csv").by_component().items()
                    if k.startswith("secagg.")
                },
                "flower_payload": info["flower_wire"],
                "institution_inner_bytes": info["institution_inner_bytes"],
                "max_abs_diff_vs_simulated": _max_diff(state, sim.final_state),
            }
    finally:
        site.down()
    return out


def report(result: dict[str, Any]) -> str:
    r = result["results"]
    sim, dep, sec = r["simulated"], r["deployed"], r["deployed_secagg"]

    def top(x: dict) -> int:
        return sum(v for k, v in x.items() if "global" in k)

    rows = [
        (
            "simulated (in-process)",
            sim["run_s"],
            sim["launch_s"],
            top(sim["bytes_by_edge"]),
            "-",
            "-",
        ),
        (
            "deployed, TLS + SuperNode auth",
            dep["run_s"],
            dep["launch_s"],
            top(dep["top_edge_ledger"]),
            dep["flower_payload"]["down_bytes"] + dep["flower_payload"]["up_bytes"],
            f"{dep['max_abs_diff_vs_simulated']:.1e}",
        ),
        (
            "deployed + SecAgg+",
            sec["run_s"],
            sec["launch_s"],
            top(sec["top_edge_ledger"]),
            sec["flower_payload"]["down_bytes"] + sec["flower_payload"]["up_bytes"],
            f"{sec['max_abs_diff_vs_simulated']:.1e}",
        ),
    ]
    lines = [
        "# Deployment over Flower vs simulation (same config, seed 0)",
        "",
        provenance(
            result["machine_before"],
            result["machine_after"],
            source="`machine_before` and `machine_after` in results.json",
        ),
        shared_cpu_note(result["machine_before"], result["machine_after"]),
        "",
        "2 institutions x 4 students, 3 rounds, tiny backbone (d_model 32), `runtime.name=local` "
        "at every institution; SuperLink and SuperNodes on this machine (localhost, TLS). "
        f"Flower processes' start-up (SuperLink, key registration, 2 SuperNodes): "
        f"{r['startup_s']:.1f} s, not in the run times.",
        "",
        "| way | run (s) | launch (s) | top-edge ledger bytes | Flower payload bytes | max abs diff of final state vs simulated |",
        "|---|---|---|---|---|---|",
    ]
    for name, run_s, launch_s, ledger, payload, diff in rows:
        lines.append(f"| {name} | {run_s:.1f} | {launch_s:.1f} | {ledger} | {payload} | {diff} |")
    secagg_bytes = sec["top_edge_by_component_secagg"]
    lines += [
        "",
        "run = the run's own `total_s` (summary.json); launch = wall time of the whole command "
        "(`flwr run` included). Top-edge ledger bytes: what hierfed's Channel recorded on "
        "institution<->global (the update's wire size per component; under SecAgg+ the "
        "protocol's records per stage instead of the update). Flower payload: the bytes hierfed "
        "put into and read out of Flower messages (the serialized state, config and replies; "
        "under SecAgg+ also the protocol records), not TLS or HTTP framing.",
        "",
        f"SecAgg+ bytes by stage (both directions, all institutions): {json.dumps(secagg_bytes)}",
        "",
        "Inner edges (students<->institution) stay at the SuperNodes and match the simulated "
        f"ledger: {json.dumps(dep['institution_inner_bytes'])}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/deploy")
    ap.add_argument("--rewrite", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if args.rewrite:
        result = json.loads((out / "results.json").read_text())
    else:
        before = machine_info()
        with tempfile.TemporaryDirectory(prefix="hierfed-deploy-bench-") as tmp:
            results = measure(Path(tmp))
        result = {"machine_before": before, "machine_after": machine_info(), "results": results}
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "REPORT.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
