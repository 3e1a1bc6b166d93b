"""``python -m benchmarks.overhead run|one|report``.

``run`` runs every (implementation, N, participation) in its own fresh process, samples the
peak memory of that process tree, and writes ``results.json``, ``results.csv`` and ``REPORT.md``.
``one`` is the child: it runs a single implementation and writes ``record.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.overhead.workload import Workload


def _one(args: argparse.Namespace) -> int:
    from benchmarks.overhead.impls import IMPLS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w = Workload(args.clients, args.participation, args.rounds, args.seed, args.lora_rank)
    rec = IMPLS[args.impl](w, out)
    (out / "record.json").write_text(json.dumps(rec, indent=1))
    return 0


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from benchmarks.machine import machine_info
    from benchmarks.overhead.report import write_report
    from benchmarks.procmem import PeakTreeMemory

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    before = machine_info()
    cases = [(impl, n, p) for n in args.clients for p in args.participation for impl in args.impls]
    records = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as prog:
        task = prog.add_task("overhead", total=len(cases))
        for impl, n, p in cases:
            w = Workload(n, p, args.rounds, args.seed, args.lora_rank)
            prog.update(task, description=f"{impl} {w.tag}")
            case_dir = out / "runs" / f"{impl}-{w.tag}"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.overhead",
                "one",
                "--impl",
                impl,
                "--clients",
                str(n),
                "--participation",
                str(p),
                "--rounds",
                str(args.rounds),
                "--seed",
                str(args.seed),
                "--lora-rank",
                str(args.lora_rank),
                "--out",
                str(case_dir),
            ]
            load0 = machine_info()["load_avg_1_5_15"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            with PeakTreeMemory(proc.pid) as mem:
                log, _ = proc.communicate(timeout=args.timeout)
            wall = time.perf_counter() - t0
            (case_dir).mkdir(parents=True, exist_ok=True)
            (case_dir / "log.txt").write_text(log)
            rec = {
                "impl": impl,
                "clients": n,
                "participation": p,
                "rounds": args.rounds,
                "seed": args.seed,
                "lora_rank": args.lora_rank,
                "tag": w.tag,  # the case's folder under runs/ is f"{impl}-{tag}"
                "wall_s": wall,
                "peak_rss_gib": mem.peak_gib,
                "peak_procs": mem.peak_procs,
                "load_avg_before": load0,
                "load_avg_after": machine_info()["load_avg_1_5_15"],
                "returncode": proc.returncode,
            }
            if proc.returncode == 0:
                rec.update(json.loads((case_dir / "record.json").read_text()))
            else:
                rec["error"] = log.strip().splitlines()[-1] if log.strip() else "failed"
                console.print(f"[red]{impl} {w.tag} failed[/]: {rec['error']}")
            records.append(rec)
            prog.advance(task)
    after = machine_info()
    results = {
        "benchmark": "overhead",
        "machine_before": before,
        "machine_after": after,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out)
    console.print(f"results: {out}/REPORT.md")
    return 0 if all(r["returncode"] == 0 for r in records) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the workload with every implementation")
    r.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    r.add_argument("--participation", type=float, nargs="+", default=[1.0, 0.1])
    r.add_argument(
        "--impls",
        nargs="+",
        default=["floor", "hierfed", "flower"],
        choices=["floor", "hierfed", "flower"],
    )
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--timeout", type=float, default=1800)
    r.add_argument("--out", default="benchmarks/out/overhead")
    o = sub.add_parser("one", help="(internal) run one implementation in this process")
    o.add_argument("--impl", required=True, choices=["floor", "hierfed", "flower"])
    o.add_argument("--clients", type=int, required=True)
    o.add_argument("--participation", type=float, required=True)
    o.add_argument("--rounds", type=int, default=5)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", required=True)
    for sp in (r, o):
        sp.add_argument(
            "--lora-rank",
            type=int,
            default=0,
            help="0 (default): the plain small MLP; r > 0: add a rank-r peft LoRA adapter on fc1",
        )
    rep = sub.add_parser("report", help="rebuild REPORT.md / results.csv from results.json")
    rep.add_argument("out")
    args = p.parse_args(argv)
    if args.cmd == "one":
        return _one(args)
    if args.cmd == "report":
        from benchmarks.overhead.report import write_report

        write_report(Path(args.out))
        return 0
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
