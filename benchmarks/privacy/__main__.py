"""``python -m benchmarks.privacy [--rounds 5] [--seeds 0] [--out DIR] [--rewrite]``: noise-aware aggregation
against the plain weighted mean when institutions have heterogeneous DP budgets.

Three institutions, each its own jurisdiction: sample-level DP-SGD budgets epsilon = 1, 4 and
16 (delta 1e-5, clip 1) over the run, noise multipliers derived with Opacus from the budget
and the planned rounds. Plain SGD, so the noise variance of each client's delta is known from
its policy: steps x (lr sigma C / B)^2 (``update_noise_variance``); an institution's update
(the sample-weighted mean of its students') has variance ``sum n_i^2 v_i / (sum n_i)^2``.

Variants, all with the weighted mean inside each institution (one policy per institution):

* ``weighted_mean`` at the global tier (FedAvg);
* ``noise_aware`` with the variances known from the policies (``tau2 = 0``: noise only);
* the same with ``auto_tau2`` (the true between-institution spread estimated each round);
* ``noise_aware`` with variances estimated from the updates themselves;
* ``no_dp``: no privacy at all (the ceiling).

Reported: final global held-out accuracy (mean of the tasks) and each institution's
held-out accuracy (its students' test rows, mean over students and tasks), averaged over the
seeds. Results: ``<out>/noise_aware.json`` and ``<out>/report.md``; ``--rewrite`` rebuilds the
report from the JSON without running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, provenance

BUDGETS = {"inst-00": 1.0, "inst-01": 4.0, "inst-02": 16.0}

BASE: dict[str, Any] = {
    "runtime.name": "local",
    "rounds": 5,
    "data.num_institutions": 3,
    "data.students_per_institution": 4,
    "data.samples_per_student": 48,
    "data.global_test_size": 300,
    "data.essay_only_institutions": 0,
    "data.missing_modality": 0.0,
    "model.d_model": 16,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.prompt_tokens": 2,
    "train.batch_size": 16,
    "train.optimizer": "sgd",
    "train.lr": 0.1,
    "eval.every": 100,
    "eval.personalized": True,
}


def privacy_overrides() -> dict[str, Any]:
    ov: dict[str, Any] = {}
    for inst, eps in BUDGETS.items():
        name = f"p_{inst.replace('-', '')}"
        ov[f"privacy.policies.{name}.epsilon"] = eps
        ov[f"privacy.policies.{name}.clip_norm"] = 1.0
        ov[f"privacy.assign.global/{inst}/*"] = name
    return ov


def known_variances(overrides: list[str]) -> dict[str, float]:
    """Per institution: the noise variance of its update, from its students' policies."""
    from hierfed.config import load_config
    from hierfed.privacy.policy import plan_for, update_noise_variance
    from hierfed.simulation import build_federation

    cfg = load_config(None, overrides, topology="hierarchical")
    fed = build_federation(cfg)
    acc: dict[str, list[tuple[float, float]]] = {}
    for c in fed.clients:
        n = fed.train[c.id].__len__()
        plan = plan_for(cfg, c, n, fed.tier_names)
        assert plan is not None
        inst = "/".join(c.path[:2])
        acc.setdefault(inst, []).append(
            (float(n), update_noise_variance(plan, lr=cfg.train.lr, num_rows=n))
        )
    return {
        inst: sum(w * w * v for w, v in xs) / sum(w for w, _ in xs) ** 2 for inst, xs in acc.items()
    }


def run_variant(name: str, seed: int, rounds: int) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.simulation import run

    ov = {**BASE, "seed": seed, "rounds": rounds}
    if name != "no_dp":
        ov.update(privacy_overrides())
    base_list = [f"{k}={v}" for k, v in ov.items()]
    extra: list[str] = []
    if name.startswith("noise_aware_known"):
        extra.append("topology.tiers.global.aggregator=noise_aware")
        for inst, v in known_variances(base_list).items():
            extra.append(f"topology.tiers.global.options.variances.{inst}={v!r}")
        if name == "noise_aware_known_auto":
            extra.append("topology.tiers.global.options.auto_tau2=true")
    elif name == "noise_aware_estimated":
        extra.append("topology.tiers.global.aggregator=noise_aware")
    cfg = load_config(None, base_list + extra, topology="hierarchical")
    t0 = time.perf_counter()
    res = run(cfg, write=False)
    final = res.final_metrics
    per_inst: dict[str, list[float]] = {}
    for cid, tasks in res.personalized.items():
        per_inst.setdefault(cid.split("/")[1], []).append(sum(tasks.values()) / len(tasks))
    last = res.metrics[-1]
    eps = {c: r["epsilon"] for c, r in last.get("dp_sample", {}).get("clients", {}).items()}
    return {
        "variant": name,
        "seed": seed,
        "global": sum(final.values()) / len(final),
        "per_task": final,
        "per_institution": {k: sum(v) / len(v) for k, v in sorted(per_inst.items())},
        "epsilon_max_per_institution": {
            i: max((e for c, e in eps.items() if f"/{i}/" in c), default=0.0) for i in BUDGETS
        },
        "wall_s": time.perf_counter() - t0,
        "overrides": base_list + extra,
    }


VARIANTS = [
    "weighted_mean",
    "noise_aware_known",
    "noise_aware_known_auto",
    "noise_aware_estimated",
    "no_dp",
]


def _machines(meta: dict[str, Any]) -> list[str]:
    """The machine sentence; one per command when the rows of several were merged (meta.parts)."""
    parts = meta.get("parts")
    if not parts:
        return [
            provenance(
                meta["machine"],
                source="`meta.machine` in noise_aware.json, taken after the last variant ran",
            )
        ]
    return [
        f"- seeds {part['seeds']}: "
        + provenance(
            part["machine"],
            source=f"`meta.parts[{i}].machine` in noise_aware.json, taken as the command ended",
        )
        for i, part in enumerate(parts)
    ]


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """report.md's text; ``meta`` carries command, seeds, rounds, wall_s and machine (or parts)."""

    def avg(variant: str, key: str, sub: str | None = None) -> float:
        xs = [r[key][sub] if sub else r[key] for r in rows if r["variant"] == variant]
        return sum(xs) / len(xs) if xs else float("nan")

    insts = list(BUDGETS)
    lines = [
        "# Noise-aware aggregation vs the weighted mean under heterogeneous DP budgets",
        "",
        f"Command: `{meta['command']}`  ",
        f"Seeds: {meta['seeds']}; rounds: {meta['rounds']}; 3 institutions x {BASE['data.students_per_institution']} "
        f"students; sample-level DP-SGD budgets (delta 1e-5): "
        + ", ".join(f"{i} eps={e:g}" for i, e in BUDGETS.items())
        + f". Wall time {meta['wall_s']:.0f} s on shared CPUs.",
        "",
        *_machines(meta),
        "",
        "| variant | global acc | "
        + " | ".join(f"{i} (eps={BUDGETS[i]:g}) acc" for i in insts)
        + " |",
        "|---|---|" + "---|" * len(insts),
    ]
    for v in VARIANTS:
        if not any(r["variant"] == v for r in rows):
            continue
        lines.append(
            f"| {v} | {avg(v, 'global'):.3f} | "
            + " | ".join(f"{avg(v, 'per_institution', i):.3f}" for i in insts)
            + " |"
        )
    seeds = sorted({r["seed"] for r in rows})
    lines += [
        "",
        "Global accuracy per seed:",
        "",
        "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for v in VARIANTS:
        per = {r["seed"]: r["global"] for r in rows if r["variant"] == v}
        if per:
            lines.append(
                f"| {v} | " + " | ".join(f"{per[s]:.3f}" if s in per else "—" for s in seeds) + " |"
            )
    lines.append("")
    for v in ("noise_aware_known", "noise_aware_known_auto", "noise_aware_estimated"):
        diffs = [
            r["global"] - m["global"]
            for r in rows
            if r["variant"] == v
            for m in rows
            if m["variant"] == "weighted_mean" and m["seed"] == r["seed"]
        ]
        if diffs:
            lines.append(
                f"- {v} minus weighted_mean, global accuracy: mean {100 * sum(diffs) / len(diffs):+.1f} points "
                f"(per seed: {', '.join(f'{100 * d:+.1f}' for d in diffs)})."
            )
    lines.append("")
    spent = [r for r in rows if r["variant"] == "weighted_mean"]
    if spent:
        lines.append(
            "Largest cumulative epsilon per institution at the end (first seed, weighted_mean run): "
            + ", ".join(f"{i}: {e:.2f}" for i, e in spent[0]["epsilon_max_per_institution"].items())
            + "."
        )
    if meta.get("notes"):
        lines += ["", *meta["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.privacy")
    ap.add_argument("--out", default="benchmarks/results/privacy")
    ap.add_argument("--rounds", type=int, default=BASE["rounds"])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--rewrite",
        action="store_true",
        help="only rebuild report.md in --out from its noise_aware.json (runs nothing)",
    )
    args = ap.parse_args(argv)
    if args.rewrite:
        rewrite_report(args.out)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for v in args.variants.split(","):
            r = run_variant(v, seed, args.rounds)
            rows.append(r)
            print(
                f"{v:>22} seed={seed} global={r['global']:.3f} per_inst={r['per_institution']} ({r['wall_s']:.0f}s)",
                flush=True,
            )
            (out / "noise_aware.json").write_text(json.dumps({"rows": rows}, indent=1))
            partial = {
                "command": "(partial) python -m benchmarks.privacy "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "seeds": args.seeds,
                "rounds": args.rounds,
                "wall_s": time.perf_counter() - t0,
                "machine": machine_info(),
            }
            (out / "report.md").write_text(report(rows, partial))
    meta = {
        "command": "python -m benchmarks.privacy "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seeds": args.seeds,
        "rounds": args.rounds,
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    (out / "noise_aware.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "report.md").write_text(report(rows, meta))
    print((out / "report.md").read_text())
    return 0


def rewrite_report(out: str = "benchmarks/results/privacy") -> None:
    """Rebuild report.md from noise_aware.json (no reruns)."""
    data = json.loads((Path(out) / "noise_aware.json").read_text())
    (Path(out) / "report.md").write_text(report(data["rows"], data["meta"]))


if __name__ == "__main__":
    raise SystemExit(main())
