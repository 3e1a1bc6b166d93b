"""Continual FL on real data: forgetting under naive fine-tuning, and what mitigations buy.

    python -m benchmarks.continual [--seeds 0 1 2] [--out benchmarks/results/continual]

Two scenarios, each run with the local runtime for every (variant, seed):

* ``digits``: scikit-learn digits (``benchmarks.continual.tasks``: tasks ``digit``,
  ``parity``, ``high`` on the same scans), 3 institutions x 3 students, 12 rounds; each task's
  data exists for one stage: digit rounds 1-4, parity 5-8, high 9-12 (task-incremental with a
  head per task; the image encoder and the backbone adapters are shared);
* ``chem97``: the real A-level hierarchy (schools -> LEAs -> global; the first 16 LEAs, 8
  schools each), 10 rounds; ``alevel_grade`` data in rounds 1-5, then ``alevel_score``
  (regression) arrives and the grade data is gone.

Variants: ``naive`` (fine-tune on whatever data there is), ``replay`` (32 kept rows per old task
and client), ``ewc`` (lambda below; Fisher on those rows), ``ewc+replay``. Metrics per run come
from the run's ``continual.json`` (global model): ACC, BWT, FWT, forgetting, aggregation
forgetting, and the final metric of the newest task (what a mitigation costs the new task).
Writes ``results.json``, ``REPORT.md`` and PNG plots in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, provenance, shared_cpu_note

EWC = 100.0
MEMORY = 32
COMMON = {
    "runtime.name": "local",
    "eval.personalized": False,
    "eval.equity": False,
    "checkpoint.every": 0,
    "model.d_model": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.prompt_tokens": 2,
    "train.batch_size": 16,
    "continual.memory": MEMORY,
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "digits": {
        "plugins": "[benchmarks.continual.tasks]",
        "data.name": "digits-tasks",
        "data.num_institutions": 3,
        "data.students_per_institution": 3,
        "data.global_test_size": 400,
        "rounds": 12,
        "continual.tasks": "{digit: [1, 5], parity: [5, 9], high: 9}",
    },
    "chem97": {
        "data.name": "chem97",
        "data.options": "{leas: 16, schools_per_lea: 8}",
        "data.global_test_size": 600,
        "rounds": 10,
        "continual.tasks": "{alevel_grade: [1, 6], alevel_score: 6}",
    },
}
VARIANTS: dict[str, dict[str, Any]] = {
    "naive": {},
    "replay": {"continual.replay": True},
    "ewc": {"continual.ewc": EWC},
    "ewc+replay": {"continual.ewc": EWC, "continual.replay": True},
}
KEYS = ("acc", "bwt", "fwt", "forgetting", "aggregation_forgetting", "newest")


def one_run(scenario: str, variant: str, seed: int, out: Path) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.simulation import run

    over = {**COMMON, **SCENARIOS[scenario], **VARIANTS[variant], "seed": seed}
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()], out=str(out))
    t0 = time.perf_counter()
    run(cfg, overwrite=True)
    wall = time.perf_counter() - t0
    c = json.loads((out / "continual.json").read_text())
    g = c["global"]
    newest = c["tasks"][-1]
    curves = [
        {"round": m["round"], **m["global"]}
        for m in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
        if m.get("global")
    ]
    return {
        "scenario": scenario,
        "variant": variant,
        "seed": seed,
        "wall_s": round(wall, 2),
        "overrides": {k: str(v) for k, v in over.items()},
        "tasks": c["tasks"],
        "stage_starts": c["stage_starts"],
        "matrix": g["matrix"],
        "baseline": c["baseline"],
        "acc": g["acc"],
        "bwt": g["bwt"],
        "fwt": g["fwt"],
        "forgetting": g["forgetting"],
        "aggregation_forgetting": (c.get("aggregation") or {}).get("mean"),
        "newest": g["matrix"][-1][c["tasks"].index(newest)],
        "curves": curves,
    }


def _stat(xs: list[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scen in SCENARIOS:
        for var in VARIANTS:
            sel = [r for r in runs if r["scenario"] == scen and r["variant"] == var]
            if sel:
                out.setdefault(scen, {})[var] = {k: _stat([r[k] for r in sel]) for k in KEYS}
    return out


def _pm(s: dict[str, Any]) -> str:
    return "-" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"


def plots(runs: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for scen in summary:
        sel = [
            r for r in runs if r["scenario"] == scen and r["seed"] == min(x["seed"] for x in runs)
        ]
        fig, axes = plt.subplots(1, len(sel), figsize=(4 * len(sel), 3.2), sharey=True)
        for ax, r in zip(axes, sel):
            xs = [p["round"] for p in r["curves"]]
            for t in r["tasks"]:
                ax.plot(xs, [p.get(t) for p in r["curves"]], marker=".", label=t)
            for s in r["stage_starts"][1:]:
                ax.axvline(s - 0.5, color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{scen}: {r['variant']} (seed {r['seed']})", fontsize=9)
            ax.set_xlabel("round (dashed: a new task arrives)")
        axes[0].set_ylabel("global model metric per task")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        name = f"{scen}-curves.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        names.append(name)
    fig, axes = plt.subplots(1, len(summary), figsize=(4.5 * len(summary), 3.2))
    for ax, (scen, by_var) in zip(axes if len(summary) > 1 else [axes], summary.items()):
        vs = list(by_var)
        ax.bar(
            vs,
            [by_var[v]["forgetting"]["mean"] for v in vs],
            yerr=[by_var[v]["forgetting"]["std"] for v in vs],
            capsize=4,
        )
        ax.set_title(f"{scen}: average forgetting (mean ± std, seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "forgetting.png", dpi=90)
    plt.close(fig)
    return [*names, "forgetting.png"]


def report(result: dict[str, Any]) -> str:
    s = result["summary"]
    lines = [
        "# Continual federated learning: forgetting and mitigations",
        "",
        f"Command: `python -m benchmarks.continual --seeds {' '.join(map(str, result['seeds']))}`. "
        + provenance(
            result["machine_before"],
            result["machine_after"],
            source="`machine_before` and `machine_after` in results.json",
        ),
        shared_cpu_note(result["machine_before"], result["machine_after"]),
        "",
        "Metrics of the global model on the global test set (hierfed/continual/metrics.py, "
        "docs/continual.md): ACC = mean final metric over all tasks; BWT (Lopez-Paz & Ranzato "
        "2017) = mean over old tasks of final minus just-learned; forgetting (Chaudhry et al. "
        "2018) = mean over old tasks of best earlier minus final; FWT = mean over later tasks of "
        "(metric before its data arrived) minus random init; aggregation forgetting = old-task "
        "metric of a client's own model after local training minus that of the merged state "
        "(mean over clients and probed stages); newest = final metric of the last task to arrive "
        f"(what a mitigation may cost the new task). Mean ± sample std over seeds {result['seeds']}. "
        f"Mitigations: replay of {MEMORY} kept rows per old task and client; EWC lambda {EWC} "
        "(Fisher scaled to max 1, on the same rows). Chem97's `alevel_score` is a regression: "
        "its metric is -MSE (standardised), so ACC mixes an accuracy and a -MSE there.",
        "",
    ]
    for scen, by_var in s.items():
        cfg = SCENARIOS[scen]
        lines += [
            f"## {scen}",
            "",
            f"Schedule `continual.tasks={cfg['continual.tasks']}`, {cfg['rounds']} rounds.",
            "",
            "| variant | ACC | BWT | forgetting | FWT | aggregation forgetting | newest task | wall s (mean) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for var, st in by_var.items():
            walls = [
                r["wall_s"] for r in result["runs"] if r["scenario"] == scen and r["variant"] == var
            ]
            lines.append(
                f"| {var} | {_pm(st['acc'])} | {_pm(st['bwt'])} | {_pm(st['forgetting'])} | "
                f"{_pm(st['fwt'])} | {_pm(st['aggregation_forgetting'])} | {_pm(st['newest'])} | "
                f"{statistics.fmean(walls):.1f} |"
            )
        naive = by_var.get("naive")
        if naive and naive["forgetting"]["mean"] is not None:
            for var, st in by_var.items():
                if var == "naive" or st["forgetting"]["mean"] is None:
                    continue
                d_f = st["forgetting"]["mean"] - naive["forgetting"]["mean"]
                d_n = st["newest"]["mean"] - naive["newest"]["mean"]
                lines.append(
                    f"\n* {var} vs naive: forgetting {d_f:+.3f}, newest task {d_n:+.3f}, "
                    f"ACC {st['acc']['mean'] - naive['acc']['mean']:+.3f}."
                )
        lines += ["", f"![{scen} curves]({scen}-curves.png)", ""]
    lines += ["![forgetting](forgetting.png)", ""]
    lines.append(
        "Wall times are single measurements per run on a shared 2-core machine (local "
        "runtime, in-process), each including the stage-end evaluations and the aggregation probe."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default="benchmarks/results/continual")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = machine_info()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for scen in args.scenarios:
            for var in args.variants:
                for seed in args.seeds:
                    r = one_run(scen, var, seed, Path(tmp) / f"{scen}-{var}-{seed}")
                    print(
                        f"{scen:7s} {var:11s} seed {seed}: forgetting {r['forgetting']:.3f} "
                        f"acc {r['acc']:.3f} newest {r['newest']:.3f} ({r['wall_s']:.1f} s)",
                        flush=True,
                    )
                    runs.append(r)
    summary = summarize(runs)
    result = {
        "machine_before": before,
        "machine_after": machine_info(),
        "seeds": args.seeds,
        "ewc_lambda": EWC,
        "memory": MEMORY,
        "summary": summary,
        "runs": runs,
    }
    result["plots"] = plots(runs, summary, out)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "REPORT.md").write_text(report(result))
    print(f"wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
