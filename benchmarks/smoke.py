"""``python -m benchmarks.smoke [--out DIR]`` — what ``make bench-smoke`` runs.

Runs the tiny suite (benchmarks/suites/smoke.yaml), the overhead benchmark at N=100 (full
participation, all three implementations) and the GPU benchmark's CPU smoke
(``benchmarks.gpu --device cpu --quick``: plain loop, one at a time, batched), then checks that every output exists and is
well-formed. It checks files and math, never timings: hierfed's final model must equal the
plain loop's bit for bit, and Flower's accuracy must agree with the floor's.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SmokeFailure(Exception):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SmokeFailure(what)


def check_suite(out: Path) -> list[str]:
    from benchmarks.suite import load_suite

    suite = load_suite(out / "suite.yaml")
    status = json.loads((out / "status.json").read_text())
    ok = [s for s in status if s["status"] == "ok"]
    _check(
        len(status) == len(suite.entries) * len(suite.seeds),
        "status.json has one entry per configuration and seed",
    )
    _check(
        any(
            s["status"] == "skipped" and "not registered" in (s.get("reason") or "") for s in status
        ),
        "an unregistered topology is reported as skipped with its reason",
    )
    _check(len(ok) >= 2 * len(suite.seeds), "at least two configurations ran on every seed")
    with (out / "tidy.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for s in ok:
        mine = [r for r in rows if r["config"] == s["config"] and int(r["seed"]) == s["seed"]]
        _check(
            len(mine) == s["rounds"] + 1,
            f"tidy.csv has rounds 0..{s['rounds']} for {s['config']} seed {s['seed']}",
        )
        _check(
            all(0.0 <= float(r["metric"]) <= 1.0 for r in mine),
            f"metrics of {s['config']} are accuracies in [0, 1]",
        )
        _check(
            all(
                float(b) >= float(a)
                for a, b in zip(
                    [r["bytes_total"] for r in mine], [r["bytes_total"] for r in mine][1:]
                )
            ),
            f"cumulative bytes of {s['config']} never decrease",
        )
        _check(
            (out / "metrics" / f"{s['config']}__seed{s['seed']}.jsonl").is_file(),
            "per-run metrics are kept",
        )
    for png in (
        "metric_vs_round.png",
        "metric_vs_top_bytes.png",
        "metric_vs_total_bytes.png",
        "metric_vs_sim_time.png",
    ):
        _check((out / png).read_bytes()[:8] == PNG_MAGIC, f"{png} is a PNG")
    report = (out / "REPORT.md").read_text()
    _check(
        "## Time to target" in report and "## Final round" in report, "REPORT.md has its sections"
    )
    return [
        f"suite: {len(ok)} runs ok, {len(status) - len(ok)} skipped/failed (expected: the unregistered one)"
    ]


def check_overhead(out: Path, rounds: int) -> list[str]:
    data = json.loads((out / "results.json").read_text())
    recs = {r["impl"]: r for r in data["records"]}
    _check(set(recs) == {"floor", "hierfed", "flower"}, "the three implementations ran")
    for impl, r in recs.items():
        _check(r["returncode"] == 0, f"{impl} exited 0 ({r.get('error')})")
        _check(len(r["round_s"]) == rounds, f"{impl} timed {rounds} rounds")
        _check(
            0.0 <= r["accuracy"] <= 1.0 and r["peak_rss_gib"] > 0,
            f"{impl} has an accuracy and a peak memory",
        )
    _check(
        recs["hierfed"]["max_abs_diff_vs_floor"] == 0.0,
        "hierfed's final model equals the plain loop's bit for bit",
    )
    _check(
        abs(recs["flower"]["accuracy"] - recs["floor"]["accuracy"]) <= 0.02,
        "Flower's accuracy agrees with the floor's",
    )
    _check("| hierfed |" in (out / "REPORT.md").read_text(), "overhead REPORT.md lists hierfed")
    return [
        f"overhead: accuracy floor {recs['floor']['accuracy']:.4f}, hierfed {recs['hierfed']['accuracy']:.4f} "
        f"(bit-identical), flower {recs['flower']['accuracy']:.4f}"
    ]


def check_gpu_quick(out: Path) -> list[str]:
    """``benchmarks.gpu --device cpu --quick``: the bench-gpu code path, on the CPU."""
    data = json.loads((out / "results.json").read_text())
    _check(data["quick"] and data["device"] == "cpu", "the gpu smoke ran --quick on the CPU")
    counts = [row["clients"] for row in data["table"]]
    _check(counts == [1, 4], f"the gpu smoke measured 1 and 4 clients (got {counts})")
    for row in data["table"]:
        _check(
            all(row["rows_per_s"][k] > 0 for k in ("plain", "one", "batched")),
            "the gpu smoke has a throughput for the plain loop, one at a time and batched",
        )
        _check(
            row["max_abs_diff"] == 0.0,
            "batched LoRA on the BERT architecture equals one at a time bit for bit on the CPU",
        )
    _check("| hierfed batched rows/s |" in (out / "REPORT.md").read_text(), "gpu REPORT.md")
    return ["gpu (--device cpu --quick): plain, one at a time and batched ran; batched == one"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smoke")
    p.add_argument("--out", default="benchmarks/out/smoke")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():  # a fresh folder: stale files of an earlier run must not pass the checks
        shutil.rmtree(out)
    t0 = time.perf_counter()
    py = sys.executable
    steps = [
        [
            py,
            "-m",
            "benchmarks",
            "run",
            "benchmarks/suites/smoke.yaml",
            "--out",
            str(out / "suite"),
        ],
        [
            py,
            "-m",
            "benchmarks.overhead",
            "run",
            "--clients",
            "100",
            "--participation",
            "1.0",
            "--rounds",
            str(args.rounds),
            "--out",
            str(out / "overhead"),
        ],
        # half the rows padded: both of a transformers backbone's batched mask paths run
        [
            py,
            "-m",
            "benchmarks.gpu",
            "--device",
            "cpu",
            "--quick",
            "--pad",
            "0.5",
            "--out",
            str(out / "gpu"),
        ],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            print(f"bench-smoke: FAILED: {' '.join(cmd)} exited {proc.returncode}", file=sys.stderr)
            return 1
    try:
        notes = (
            check_suite(out / "suite")
            + check_overhead(out / "overhead", args.rounds)
            + check_gpu_quick(out / "gpu")
        )
    except (SmokeFailure, OSError, KeyError, ValueError) as exc:
        print(f"bench-smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    for n in notes:
        print(n)
    print(f"bench-smoke: OK in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
