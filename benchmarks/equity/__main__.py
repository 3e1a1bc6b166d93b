"""``python -m benchmarks.equity [--seeds 0 1 2] [--rounds 12] [--out DIR] [--minilm]``.

Who the federated model serves worse, under FedAvg vs q-FFL vs agnostic FL, on real data:
Chem97 schools (clients) under ten of its local education authorities (LEAs): four small
ones (60-100 students) and six mid-sized ones (250-360), so small authorities are
underrepresented in FedAvg's sample weighting. Each method merges the schools of each LEA
(the tier that merges clients: the fair rules need their senders' losses, which tier nodes
do not forward yet); the global tier keeps the weighted mean of the LEAs; same seeds. Every run's ``summary.json`` carries the equity
metrics (hierfed/explain/equity.py): per-LEA and per-gender metrics of the final global
model on every school's held-out students, and their gaps. Reported per method, mean and
standard deviation over seeds: the pooled accuracy of the grade task, the worst LEA's
accuracy, the LEA gap (max - min) and standard deviation, the gender gap, and the score
task's negative MSE likewise.

``--minilm`` also trains the edu-m3t MiniLM config for a shortened schedule
(``--minilm-rounds``, local runtime) and writes its attribution report
(``python -m hierfed explain``) under ``<out>/minilm/``.

Writes ``<out>/results.json`` (every run, with its overrides, plus machine facts and the
commit), ``<out>/report.md`` and ``<out>/equity.png``. Benchmarks are not tests: nothing
here asserts. Sized for one core: about 15 s per run on the reference machine.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info, provenance, shared_cpu_note

LEAS = [7, 9, 10, 12, 15, 44, 46, 48, 59, 60]  # 4 small (60-100 students), 6 mid (250-360)
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"aggregator": "weighted_mean"},
    # q-FFL's Lipschitz estimate is 1 / the clients' SGD learning rate, as in the paper
    "qffl": {"aggregator": "qffl", "options.q": 1.0, "options.lipschitz": 20.0},
    "afl": {"aggregator": "afl", "options.step": 0.05},
}
BASE: dict[str, Any] = {
    "runtime.name": "local",
    "data.name": "chem97",
    "data.options.leas": "[" + ",".join(str(x) for x in LEAS) + "]",
    "data.test_fraction": 0.3,
    "data.global_test_size": 1000,
    "model.d_model": 16,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.prompt_tokens": 2,
    "train.local_epochs": 2,
    "train.batch_size": 16,
    "train.optimizer": "sgd",  # q-FFL's step-size term assumes SGD steps
    "train.lr": 0.05,
    "topology.tiers.lea.participation": 0.3,
    "eval.every": 100,
    "eval.personalized": False,
}


def overrides(method: str, seed: int, rounds: int) -> list[str]:
    ov = dict(BASE, seed=seed, rounds=rounds)
    for k, v in METHODS[method].items():
        ov[f"topology.tiers.lea.{k}"] = v
    return [f"{k}={v}" for k, v in ov.items()]


def run_one(method: str, seed: int, rounds: int, out: Path) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.simulation import run

    ov = overrides(method, seed, rounds)
    folder = out / "runs" / f"{method}-s{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    cfg = load_config(None, ov, topology="hierarchical", out=str(folder))
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    eq = json.loads((folder / "summary.json").read_text())["equity"]
    rec: dict[str, Any] = {"method": method, "seed": seed, "overrides": ov, "wall_s": wall}
    for t in ("alevel_grade", "alevel_score"):
        unit, gender = eq["gaps"]["unit"][t], eq["gaps"]["group:gender"][t]
        rows = eq["rows_by_unit"][t]
        pooled = sum(eq["by_unit"][t][u] * n for u, n in rows.items()) / sum(rows.values())
        rec[t] = {
            "global_test": res.final_metrics[t],
            "pooled": pooled,
            "worst_lea": unit["worst_value"],
            "worst_lea_id": unit["worst"],
            "lea_gap": unit["max_minus_min"],
            "lea_std": unit["std"],
            "by_lea": eq["by_unit"][t],
            "gender_gap": gender["max_minus_min"],
            "worst_gender": gender["worst"],
            "by_gender": eq["by_group"]["gender"][t],
        }
    return rec


def _ms(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


FIELDS = ("pooled", "worst_lea", "lea_gap", "lea_std", "gender_gap")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in METHODS:
        recs = [r for r in records if r["method"] == method]
        if not recs:
            continue
        out[method] = {
            t: {f: _ms([r[t][f] for r in recs]) for f in FIELDS}
            for t in ("alevel_grade", "alevel_score")
        }
        out[method]["wall_s"] = _ms([r["wall_s"] for r in recs])
    return out


def report(
    summary: dict[str, Any], meta: dict[str, Any], minilm: dict[str, Any] | None = None
) -> str:
    lines = [
        "# Equity on Chem97: FedAvg vs q-FFL vs agnostic FL",
        "",
        provenance(
            meta["before"], meta["after"], source="`meta.before`/`meta.after` in results.json"
        )
        + f" Seeds {meta['seeds']}, {meta['rounds']} rounds, one core (torch threads = 1). "
        + shared_cpu_note(meta["before"], meta["after"]),
        "",
        *([meta["note"], ""] if meta.get("note") else []),
        f"Ten Chem97 LEAs {LEAS} (schools are the clients; 4 small, 6 mid-sized), hierarchical "
        "schools -> LEA -> global; the method merges each LEA's schools, the global tier is the "
        "weighted mean of the LEAs. Metrics of the final global model "
        "on every school's held-out students (hierfed/explain/equity.py), mean ± sd over seeds.",
        "",
    ]
    for t, name in (("alevel_grade", "accuracy"), ("alevel_score", "negative MSE")):
        lines += [
            f"## `{t}` ({name}; higher is better)",
            "",
            "| method | pooled | worst LEA | LEA gap (max−min) | LEA sd | gender gap |",
            "|---|---|---|---|---|---|",
        ]
        for method, s in summary.items():
            cells = [f"{s[t][f][0]:.3f} ± {s[t][f][1]:.3f}" for f in FIELDS]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    if minilm:
        lines += [
            "## Attribution on edu-m3t MiniLM",
            "",
            f"Commit `{minilm.get('machine', {}).get('before', {}).get('git_commit', '?')}`. "
            f"`configs/edu-m3t-minilm.yaml` with {' '.join(minilm['overrides'])} (trained in "
            f"{minilm['train_s']:.0f} s, explained in {minilm['explain_s']:.0f} s; 8 test rows per "
            "school, 64 Integrated Gradients steps, rows not converged to 2% redone with up to 1024). Each edu-m3t task reads one modality, so "
            "each task's modality share is 1 by construction; the component ablation says "
            "more. Files: `minilm/` (attribution, ablation, equity: JSON, CSV, PNG).",
            "",
            "| task | modality | mean attribution | max completeness error |",
            "|---|---|---|---|",
        ]
        for t, r in sorted(minilm["attribution"].items()):
            for m, v in sorted(r["by_scope"]["all"].items()):
                lines.append(f"| {t} | {m} | {v['mean']:.3f} | {r['completeness_error_max']:.2g} |")
        lines += [
            "",
            "| component | task | metric drop when put back untrained |",
            "|---|---|---|",
        ]
        for c, per in sorted(minilm["ablation"].items()):
            for t, scopes in sorted(per.items()):
                lines.append(f"| {c} | {t} | {scopes['all']:.3f} |")
        lines.append("")
    lines += [
        "Wall time per run (s): "
        + ", ".join(f"{m} {s['wall_s'][0]:.1f}" for m, s in summary.items()),
        "",
    ]
    return "\n".join(lines)


def plot(summary: dict[str, Any], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (t, label) in zip(
        axes, (("alevel_grade", "grade accuracy"), ("alevel_score", "score neg. MSE"))
    ):
        x = range(len(methods))
        for k, (f, name) in enumerate(
            (("pooled", "pooled"), ("worst_lea", "worst LEA"), ("lea_gap", "LEA gap"))
        ):
            ax.bar(
                [i + 0.27 * k for i in x],
                [summary[m][t][f][0] for m in methods],
                0.27,
                yerr=[summary[m][t][f][1] for m in methods],
                label=name,
                capsize=2,
            )
        ax.set_xticks([i + 0.27 for i in x])
        ax.set_xticklabels(methods)
        ax.set_title(label)
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def minilm_attribution(out: Path, rounds: int) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.explain.report import explain_run
    from hierfed.simulation import run

    folder = out / "runs" / "minilm"
    if folder.exists():
        shutil.rmtree(folder)
    ov = [f"rounds={rounds}", "runtime.name=local", "eval.personalized=false"]
    cfg = load_config("configs/edu-m3t-minilm.yaml", ov, topology="hierarchical", out=str(folder))
    t0 = time.perf_counter()
    run(cfg)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    dest = explain_run(folder, out=out / "minilm", max_rows=8, n_steps=64)
    return {
        "overrides": ov,
        "train_s": train_s,
        "explain_s": time.perf_counter() - t1,
        "attribution": json.loads((dest / "attribution.json").read_text()),
        "ablation": json.loads((dest / "ablation.json").read_text()),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m benchmarks.equity")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="benchmarks/results/equity")
    p.add_argument("--minilm", action="store_true", help="also the MiniLM attribution report")
    p.add_argument("--minilm-rounds", type=int, default=2)
    p.add_argument(
        "--minilm-only",
        action="store_true",
        help="redo only the MiniLM report; keep the Chem97 runs of <out>/results.json",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.minilm_only:
        payload = json.loads((out / "results.json").read_text())
        m_before = machine_info()
        minilm = minilm_attribution(out, args.minilm_rounds)
        minilm["machine"] = {"before": m_before, "after": machine_info()}
        payload["minilm"] = minilm
        (out / "results.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
        (out / "report.md").write_text(report(payload["summary"], payload["meta"], minilm))
        shutil.rmtree(out / "runs", ignore_errors=True)
        print((out / "report.md").read_text())
        return 0
    before = machine_info()
    records = []
    for method in args.methods:
        for seed in args.seeds:
            rec = run_one(method, seed, args.rounds, out)
            records.append(rec)
            g = rec["alevel_grade"]
            print(
                f"{method} seed {seed}: grade pooled {g['pooled']:.3f} worst LEA "
                f"{g['worst_lea']:.3f} gap {g['lea_gap']:.3f} ({rec['wall_s']:.1f} s)",
                flush=True,
            )
    minilm = None
    if args.minilm:
        m_before = machine_info()
        minilm = minilm_attribution(out, args.minilm_rounds)
        minilm["machine"] = {"before": m_before, "after": machine_info()}
    after = machine_info()
    summary = summarize(records)
    meta = {"before": before, "after": after, "seeds": args.seeds, "rounds": args.rounds}
    payload = {"meta": meta, "summary": summary, "runs": records, "minilm": minilm}
    (out / "results.json").write_text(json.dumps(payload, indent=1, sort_keys=True))
    (out / "report.md").write_text(report(summary, meta, minilm))
    plot(summary, out / "equity.png")
    shutil.rmtree(out / "runs", ignore_errors=True)  # run folders hold tensors: not kept
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
