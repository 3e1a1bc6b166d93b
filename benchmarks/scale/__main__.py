"""``python -m benchmarks.scale run [--students 1000 2000 5000 10000] [--out DIR]``.

Hierarchical ``student -> institution -> global`` with 100 students per institution (10 -> 100
institutions), 10% of each institution's students sampled per round (all institutions take
part), the benchmark MLP on ``mlp-bench`` (benchmarks/mlp_bench.py), the Ray runtime. Every
point runs in a fresh process through ``hierfed.simulation.run``; the parent samples the peak
memory of that process tree (driver + Ray + workers). Writes results.json, results.csv,
scale.png and REPORT.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET_GIB = 4.0
PER_INSTITUTION = 100


def _one(args: argparse.Namespace) -> int:
    import psutil

    from benchmarks.mlp_bench import MLP_OVERRIDES
    from hierfed.config import load_config
    from hierfed.simulation import run

    inst = max(1, args.students // PER_INSTITUTION)
    ov = {
        **MLP_OVERRIDES,
        "data.num_institutions": inst,
        "data.students_per_institution": args.students // inst,
        "data.global_test_size": 1000,
        "rounds": args.rounds,
        "eval.every": args.rounds,
        "topology.tiers.institution.participation": args.participation,
        "runtime.name": "ray",
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in ov.items()], topology="hierarchical")
    marks: dict[str, float] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "round" and data["round"] == 0:
            marks["startup"] = time.time() - psutil.Process().create_time()

    res = run(cfg, on_event=on_event, write=False)
    rec = {
        "students": args.students,
        "institutions": inst,
        "startup_s": marks["startup"],
        "round_s": [r["wall_s"] for r in res.metrics[1:]],
        "participants": [r["participants"] for r in res.metrics[1:]],
        "bytes_per_round": [r["bytes_total"] for r in res.metrics[1:]],
        "accuracy": res.final_metrics.get("label"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    return 0


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``; returns (a, b, R^2)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot else 1.0


def write_report(out: Path) -> None:
    from benchmarks.machine import provenance, shared_cpu_note

    data = json.loads((out / "results.json").read_text())
    ok = [r for r in data["records"] if r.get("returncode") == 0]
    for r in ok:
        r["steady_round_s"] = statistics.median(r["round_s"][1:] or r["round_s"])
        r["participants_per_round"] = statistics.median(r["participants"])
    with (out / "results.csv").open("w", newline="") as fh:
        cols = [
            "students",
            "institutions",
            "participants_per_round",
            "steady_round_s",
            "startup_s",
            "wall_s",
            "peak_rss_gib",
            "peak_procs",
            "accuracy",
            "load_avg_before",
            "load_avg_after",
        ]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in ok:
            w.writerow(
                {
                    **r,
                    "load_avg_before": r["load_avg_before"][0],
                    "load_avg_after": r["load_avg_after"][0],
                }
            )
    m0, m1 = data["machine_before"], data["machine_after"]
    lines = [
        "# Scale: hierarchical, 1,000 -> 10,000 students",
        "",
        f"{PER_INSTITUTION} students per institution, 10% of each institution's students sampled per round, all "
        f"institutions every round, {data['rounds']} rounds; the benchmark MLP on `mlp-bench` (100 rows per student); "
        "Ray runtime, one worker per CPU. Each point is a fresh process; peak memory is the summed RSS of the "
        "whole process tree (driver, Ray daemons, workers), sampled every 0.1 s.",
        "",
        provenance(m0, m1, source="`machine_before` and `machine_after` in results.json"),
        "",
        shared_cpu_note(m0, m1),
        "",
        "| students | institutions | clients/round | steady round s | start-up s | peak RSS GiB (procs) | accuracy | load before/after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        lines.append(
            f"| {r['students']} | {r['institutions']} | {r['participants_per_round']:.0f} | {r['steady_round_s']:.2f} | "
            f"{r['startup_s']:.1f} | {r['peak_rss_gib']:.2f} ({r['peak_procs']}) | {r['accuracy']:.4f} | "
            f"{r['load_avg_before'][0]:.2f}/{r['load_avg_after'][0]:.2f} |"
        )
    for r in data["records"]:
        if r.get("returncode") != 0:
            lines.append(f"| {r['students']} | failed: {r.get('error')} | | | | | | |")
    if len(ok) >= 2:
        xs = [r["participants_per_round"] for r in ok]
        ys = [r["steady_round_s"] for r in ok]
        a, b, r2 = _fit(xs, ys)
        lines += [
            "",
            f"Linear fit of steady round time on participating clients: t = {a:.2f} s + {b * 1000:.2f} ms x clients "
            f"(R^2 = {r2:.3f}).",
            "",
        ]
        _plot(ok, out, a, b)
        lines += ["![scale](scale.png)", ""]
    big = [r for r in ok if r["students"] >= 10000]
    if big:
        g = big[-1]["peak_rss_gib"]
        lines.append(
            f"Target: 10,000 students under {TARGET_GIB:g} GiB peak process-tree memory — measured {g:.2f} GiB: "
            f"**{'met' if g < TARGET_GIB else 'NOT met'}**."
        )
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def _plot(ok: list[dict[str, Any]], out: Path, a: float, b: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    xs = [r["participants_per_round"] for r in ok]
    ax1.plot(xs, [r["steady_round_s"] for r in ok], "o-", label="measured")
    ax1.plot([0, max(xs)], [a, a + b * max(xs)], "--", color="grey", label="linear fit")
    ax1.set_xlabel("participating clients per round")
    ax1.set_ylabel("steady round time (s)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot([r["students"] for r in ok], [r["peak_rss_gib"] for r in ok], "o-")
    ax2.axhline(TARGET_GIB, color="grey", ls="--", lw=0.8, label=f"target {TARGET_GIB:g} GiB")
    ax2.set_xlabel("students in the federation")
    ax2.set_ylabel("peak RSS of the process tree (GiB)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale.png")
    plt.close(fig)


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks.machine import machine_info
    from benchmarks.procmem import PeakTreeMemory

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = machine_info()
    records = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(),
    ) as prog:
        task = prog.add_task("scale", total=len(args.students))
        for s in args.students:
            prog.update(task, description=f"scale: {s} students")
            case = out / "runs" / f"s{s}"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.scale",
                "one",
                "--students",
                str(s),
                "--rounds",
                str(args.rounds),
                "--participation",
                str(args.participation),
                "--out",
                str(case),
            ]
            load0 = machine_info()["load_avg_1_5_15"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            with PeakTreeMemory(proc.pid) as mem:
                log, _ = proc.communicate(timeout=args.timeout)
            rec = {
                "students": s,
                "wall_s": time.perf_counter() - t0,
                "peak_rss_gib": mem.peak_gib,
                "peak_procs": mem.peak_procs,
                "load_avg_before": load0,
                "load_avg_after": machine_info()["load_avg_1_5_15"],
                "returncode": proc.returncode,
            }
            case.mkdir(parents=True, exist_ok=True)
            (case / "log.txt").write_text(log)
            if proc.returncode == 0:
                rec.update(json.loads((case / "record.json").read_text()))
            else:
                rec["error"] = log.strip().splitlines()[-1] if log.strip() else "failed"
            records.append(rec)
            prog.advance(task)
    (out / "results.json").write_text(
        json.dumps(
            {
                "benchmark": "scale",
                "rounds": args.rounds,
                "participation": args.participation,
                "machine_before": before,
                "machine_after": machine_info(),
                "records": records,
            },
            indent=1,
        )
    )
    write_report(out)
    print((out / "REPORT.md").read_text())
    return 0 if all(r["returncode"] == 0 for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--students", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--participation", type=float, default=0.1)
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--out", default="benchmarks/out/scale")
    o = sub.add_parser("one")
    o.add_argument("--students", type=int, required=True)
    o.add_argument("--rounds", type=int, default=3)
    o.add_argument("--participation", type=float, default=0.1)
    o.add_argument("--out", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "one":
        return _one(args)
    if args.cmd == "report":
        write_report(Path(args.out))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
