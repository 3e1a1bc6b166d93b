"""``python -m benchmarks.robustness [--quick] [--jobs 2] [--out DIR]``: the attack matrix.

attack x aggregator x attacker fraction (10/20/30 % of the students), attackers on the
student tier, the robust rule at the institution tier (the global tier keeps the weighted
mean, since each institution's update is already robust). Every cell is one hierfed run on
edu-synth (local runtime) and reports the final global accuracy averaged over the four
tasks. The clean run of each aggregator (no attackers) is its reference; the plain
``weighted_mean`` (FedAvg) is the positive control and should collapse under the boosted
attacks. The report lists, per aggregator, the worst case over attacks at each fraction and
its drop from the clean FedAvg accuracy.

Results: ``<out>/matrix.json`` (every cell, with the config overrides that produced it) and
``<out>/report.md``. Benchmarks are not tests: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info

ATTACKS = ["sign_flip", "scaling", "gaussian", "label_flip", "alie"]
AGGREGATORS: dict[str, dict[str, Any]] = {
    "weighted_mean": {},
    "median": {},
    "trimmed_mean": {"trim": 0.3},
    "krum": {"f": 3, "m": 4},
    "norm_bounded": {"factor": 1.0},
}
FRACTIONS = [0.1, 0.2, 0.3]

BASE = {
    "runtime.name": "local",
    "seed": 0,
    "rounds": 6,
    "data.num_institutions": 3,
    "data.students_per_institution": 10,
    "data.samples_per_student": 40,
    "data.global_test_size": 300,
    "data.essay_only_institutions": 1,
    "model.d_model": 16,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.prompt_tokens": 2,
    "train.batch_size": 16,
    "train.lr": 0.01,
    "eval.every": 100,
    "eval.personalized": False,
}


def overrides(
    attack: str | None, fraction: float, agg: str, rounds: int | None = None
) -> list[str]:
    ov = dict(BASE)
    if rounds:
        ov["rounds"] = rounds
    ov["topology.tiers.institution.aggregator"] = agg
    for k, v in AGGREGATORS[agg].items():
        ov[f"topology.tiers.institution.options.{k}"] = v
    if attack:
        ov.update({"attack.name": attack, "attack.fraction": fraction, "attack.tier": "student"})
    return [f"{k}={v}" for k, v in ov.items()]


def run_cell(args: tuple[str | None, float, str, int | None]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from hierfed.config import load_config
    from hierfed.simulation import run

    attack, fraction, agg, rounds = args
    ov = overrides(attack, fraction, agg, rounds)
    cfg = load_config(None, ov, topology="hierarchical")
    t0 = time.perf_counter()
    res = run(cfg, write=False)
    final = res.final_metrics
    return {
        "attack": attack or "none",
        "fraction": fraction if attack else 0.0,
        "aggregator": agg,
        "accuracy": sum(final.values()) / len(final),
        "per_task": final,
        "wall_s": time.perf_counter() - t0,
        "overrides": ov,
    }


def report(cells: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    clean = {c["aggregator"]: c["accuracy"] for c in cells if c["attack"] == "none"}
    ref = clean.get("weighted_mean", float("nan"))
    lines = [
        "# Attack matrix (edu-synth, attackers on the student tier, rule at the institution tier)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Rounds: {meta['rounds']}; clients: {BASE['data.num_institutions']} institutions x "
        f"{BASE['data.students_per_institution']} students; metric: final global accuracy, mean of 4 tasks.  ",
        f"Clean FedAvg (weighted_mean, no attack): **{ref:.3f}**. Wall time: {meta['wall_s']:.0f} s "
        f"on {meta['machine'].get('cpu_count_logical', '?')} CPUs shared with other jobs "
        f"(load average at the end {meta['machine'].get('load_avg_1_5_15', '?')}); one seed (0).",
        "",
        "## Worst case over attacks (accuracy; drop from clean FedAvg in points)",
        "",
        "| aggregator | clean | " + " | ".join(f"{int(f * 100)}% worst" for f in FRACTIONS) + " |",
        "|---|---|" + "---|" * len(FRACTIONS),
    ]
    for agg in AGGREGATORS:
        row = [agg, f"{clean.get(agg, float('nan')):.3f}"]
        for f in FRACTIONS:
            cs = [
                c
                for c in cells
                if c["aggregator"] == agg and c["fraction"] == f and c["attack"] != "none"
            ]
            if not cs:
                row.append("—")
                continue
            w = min(cs, key=lambda c: c["accuracy"])
            row.append(f"{w['accuracy']:.3f} ({w['attack']}, {100 * (w['accuracy'] - ref):+.1f})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Every cell (accuracy)", ""]
    for f in FRACTIONS:
        lines += [
            f"### {int(f * 100)}% attackers",
            "",
            "| attack | " + " | ".join(AGGREGATORS) + " |",
            "|---|" + "---|" * len(AGGREGATORS),
        ]
        for a in ATTACKS:
            row = [a]
            for agg in AGGREGATORS:
                cs = [
                    c
                    for c in cells
                    if c["aggregator"] == agg and c["fraction"] == f and c["attack"] == a
                ]
                row.append(f"{cs[0]['accuracy']:.3f}" if cs else "—")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    ok = []
    for agg in AGGREGATORS:
        if agg == "weighted_mean":
            continue
        cs = [
            c
            for c in cells
            if c["aggregator"] == agg and c["fraction"] == 0.2 and c["attack"] != "none"
        ]
        if cs and len(cs) == len(ATTACKS) and min(c["accuracy"] for c in cs) >= ref - 0.10:
            ok.append(agg)
    fedavg = [c for c in cells if c["aggregator"] == "weighted_mean" and c["attack"] != "none"]
    if fedavg:
        w = min(fedavg, key=lambda c: c["accuracy"])
        lines.append(
            f"Positive control: FedAvg's worst cell is {w['attack']} at {int(w['fraction'] * 100)}% "
            f"-> {w['accuracy']:.3f} ({100 * (w['accuracy'] - ref):+.1f} points).  "
        )
    lines.append(
        "Robust aggregators within 10 points of clean FedAvg under every attack at 20%: "
        + (", ".join(ok) if ok else "none")
        + "."
    )
    lines += [
        "",
        "Reading it: the model is small and trained for few rounds (clean accuracy ~0.53), so",
        "absolute differences are small, and one seed cannot separate cells closer than a few",
        "points (not measured here: no repeat seeds). The model-update attacks are",
        "omniscient (see hierfed/attacks.py); `scaling` boosts by 100 and is what breaks FedAvg;",
        "plain `sign_flip` at 30% hurts every rule (~3 malicious of 10 students per institution,",
        "at the edge of what median/trimmed mean tolerate with trim 0.3 and of Krum with f = 3).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.robustness")
    ap.add_argument("--out", default="benchmarks/results/robustness")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--fractions", default="0.1,0.2,0.3")
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    args = ap.parse_args(argv)
    fractions = [float(x) for x in args.fractions.split(",")]
    aggs = args.aggregators.split(",")
    attacks = args.attacks.split(",")
    cells_in: list[tuple[str | None, float, str, int | None]] = [
        (None, 0.0, a, args.rounds) for a in aggs
    ]
    cells_in += [(at, f, a, args.rounds) for f in fractions for at in attacks for a in aggs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cells: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as ex:
        for cell in ex.map(run_cell, cells_in):
            cells.append(cell)
            print(
                f"{cell['aggregator']:>14} {cell['attack']:>10} {cell['fraction']:.1f} acc={cell['accuracy']:.3f} "
                f"({cell['wall_s']:.0f}s)",
                flush=True,
            )
            (out / "matrix.json").write_text(json.dumps({"cells": cells}, indent=1))
    meta = {
        "command": "python -m benchmarks.robustness "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds or BASE["rounds"],
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    (out / "matrix.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    (out / "report.md").write_text(report(cells, meta))
    print((out / "report.md").read_text())
    return 0




def rewrite_report(out: str = "benchmarks/results/robustness") -> None:
    """Rebuild report.md from matrix.json (no reruns)."""
    data = json.loads((Path(out) / "matrix.json").read_text())
    (Path(out) / "report.md").write_text(report(data["cells"], data["meta"]))


if __name__ == "__main__":
    raise SystemExit(main())
