"""Kill-and-resume drill: SIGKILL the driver at several points, resume, compare to the bit.

    python -m benchmarks.reliability.kill_resume [--out benchmarks/results/reliability] [--rewrite]

For each kill point it runs the same config as a subprocess with ``HIERFED_FAULT`` set, checks
the process died by SIGKILL, resumes with ``python -m hierfed run --resume``, and compares the
final-state SHA-256 and the metrics (minus wall-clock fields) with an uninterrupted run.
Resume overhead = (killed run + resumed run) wall time − uninterrupted wall time.
``--rewrite`` rebuilds REPORT.md from the kill_resume.json in ``--out`` without running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, provenance

OVERRIDES = [
    "runtime.name=ray",
    "runtime.num_workers=2",
    "rounds=4",
    "data.num_institutions=3",
    "data.students_per_institution=4",
    "topology.tiers.institution.participation=0.75",
    "topology.tiers.global.server_optimizer=fedadam",
    "topology.tiers.global.server_lr=0.05",
]
KILL_POINTS = ["after-round:1", "in-checkpoint:2", "before-latest:3", "after-round:3"]


def _run(args: list[str], env: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hierfed", "run", "--quiet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, time.perf_counter() - t0


def _digest(run_dir: Path) -> tuple[str, list[dict]]:
    state = hashlib.sha256((run_dir / "final_state.safetensors").read_bytes()).hexdigest()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("wall_s", None)
    return state, metrics


def report(result: dict[str, Any]) -> str:
    """REPORT.md's text from a kill_resume.json record."""
    lines = [
        "# Kill-and-resume drill",
        "",
        "Command: `python -m benchmarks.reliability.kill_resume`.",
        "",
        provenance(
            result["machine_before"],
            result["machine_after"],
            source="`machine_before` and `machine_after` in kill_resume.json",
        ),
        "",
        f"Config: edu-synth, hierarchical, Ray runtime with 2 workers, `{' '.join(result['config_overrides'])}`. "
        f"Uninterrupted run: {result['uninterrupted_s']:.1f} s (each run includes ~10 s of process and Ray start-up).",
        "",
        "| kill point | SIGKILLed | resumed | final state hash equal | metrics equal | killed run s | resume s | overhead s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['kill_point']} | {r['killed_by_sigkill']} | {r['resume_rc'] == 0} | {r['state_sha256_equal']} | "
            f"{r['metrics_equal']} | {r['killed_run_s']} | {r['resume_s']} | {r['overhead_s']} |"
        )
    return "\n".join(lines) + "\n"


def rewrite_report(out: Path) -> None:
    """Rebuild REPORT.md from kill_resume.json (nothing is run again)."""
    result = json.loads((out / "kill_resume.json").read_text())
    (out / "REPORT.md").write_text(report(result))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/reliability")
    ap.add_argument(
        "--rewrite",
        action="store_true",
        help="only rebuild REPORT.md in --out from its kill_resume.json (runs nothing)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rewrite:
        rewrite_report(out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    before = machine_info()
    env = {k: v for k, v in os.environ.items() if k != "HIERFED_FAULT"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_dir = Path(tmp) / "ref"
        rc, ref_s = _run(["--out", str(ref_dir), *OVERRIDES], env)
        if rc != 0:
            raise SystemExit(f"uninterrupted run failed with {rc}")
        ref = _digest(ref_dir)
        for point in KILL_POINTS:
            run_dir = Path(tmp) / point.replace(":", "-")
            rc_kill, kill_s = _run(
                ["--out", str(run_dir), *OVERRIDES], {**env, "HIERFED_FAULT": point}
            )
            rc_res, res_s = _run(["--resume", str(run_dir)], env)
            state, metrics = _digest(run_dir) if rc_res == 0 else ("", [])
            rows.append(
                {
                    "kill_point": point,
                    "killed_by_sigkill": rc_kill == -signal.SIGKILL,
                    "resume_rc": rc_res,
                    "state_sha256_equal": state == ref[0],
                    "metrics_equal": metrics == ref[1],
                    "killed_run_s": round(kill_s, 2),
                    "resume_s": round(res_s, 2),
                    "overhead_s": round(kill_s + res_s - ref_s, 2),
                }
            )
    result = {
        "uninterrupted_s": round(ref_s, 2),
        "reference_sha256": ref[0],
        "config_overrides": OVERRIDES,
        "rows": rows,
        "machine_before": before,
        "machine_after": machine_info(),
    }
    (out / "kill_resume.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (out / "REPORT.md").write_text(text)
    print(text, end="")
    ok = all(
        r["killed_by_sigkill"] and r["state_sha256_equal"] and r["metrics_equal"] for r in rows
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
