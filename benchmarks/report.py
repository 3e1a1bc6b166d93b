"""Rebuilds a suite's tidy.csv, plots and REPORT.md from the files a run left.

Inputs (all in the results folder): ``suite.yaml``, ``status.json``, ``machine.json`` and
``metrics/<config>__seed<s>.jsonl`` (hierfed's per-round metrics). Nothing here reruns
anything, so ``python -m benchmarks report DIR`` works on committed results.

The held-out metric is ``mean`` (the mean over tasks of the global model's per-task metric on
the global held-out set) or one task's metric, as the suite's ``target.metric`` says. Bytes
are cumulative from round 1; the *top link* is every tier edge touching the root tier
(``global``); a serverless topology (gossip) has none. Simulated time is hierfed's clock
(``sim_time_total_s``), where the run reported it.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.machine import provenance, shared_cpu_note
from benchmarks.suite import load_suite

ROOT_TIER = "global"


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def tidy_rows(out: Path, metric: str) -> list[dict[str, Any]]:
    """One row per (configuration, seed, round) with cumulative bytes and simulated time."""
    topo = {
        (s["config"], s["seed"]): s["topology"]
        for s in json.loads((out / "status.json").read_text())
    }
    rows: list[dict[str, Any]] = []
    for path in sorted((out / "metrics").glob("*__seed*.jsonl")):
        config, _, seed_s = path.stem.rpartition("__seed")
        seed = int(seed_s)
        cum_edges: dict[str, float] = defaultdict(float)
        cum_sim = 0.0
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            for edge, b in (rec.get("bytes") or {}).items():
                cum_edges[edge] += b
            if "sim_time_total_s" in rec:
                cum_sim = _num(rec["sim_time_total_s"])
            elif "sim_time_s" in rec:
                cum_sim += _num(rec["sim_time_s"])
            glob = rec.get("global") or {}
            row: dict[str, Any] = {
                "config": config,
                "topology": topo.get((config, seed), ""),
                "seed": seed,
                "round": rec["round"],
                "metric": _metric(glob, metric),
                "bytes_top": sum(b for e, b in cum_edges.items() if ROOT_TIER in _tiers(e)),
                "bytes_total": sum(cum_edges.values()),
                "sim_time_s": cum_sim
                if ("sim_time_total_s" in rec or "sim_time_s" in rec or rec["round"] == 0)
                else float("nan"),
                "wall_s": _num(rec.get("wall_s")),
                "train_loss": _num(rec.get("train_loss")),
            }
            for t, v in sorted(glob.items()):
                row[f"metric_{t}"] = _num(v)
            for e, b in sorted(cum_edges.items()):
                row[f"bytes_edge:{e}"] = b
            rows.append(row)
        if not any(ROOT_TIER in _tiers(e) for e in cum_edges):  # serverless: there is no top link
            for row in rows:
                if row["config"] == config and row["seed"] == seed:
                    row["bytes_top"] = float("nan")
    return rows


def _tiers(edge: str) -> set[str]:
    return set(edge.replace("<->", "->").split("->"))


def _metric(glob: dict[str, Any], metric: str) -> float:
    if not glob:
        return float("nan")
    if metric == "mean":
        vals = [_num(v) for v in glob.values()]
        return sum(vals) / len(vals)
    return _num(glob.get(metric))


def write_tidy(rows: list[dict[str, Any]], path: Path) -> None:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            )


def read_tidy(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as fh:
        for r in csv.DictReader(fh):
            out: dict[str, Any] = {}
            for k, v in r.items():
                if k in ("config", "topology"):
                    out[k] = v
                elif k in ("seed", "round"):
                    out[k] = int(v)
                else:
                    out[k] = float(v) if v != "" else float("nan")
            rows.append(out)
    return rows


def _by_run(rows: list[dict[str, Any]]) -> dict[str, dict[int, list[dict[str, Any]]]]:
    runs: dict[str, dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        runs[r["config"]][r["seed"]].append(r)
    for cfg in runs.values():
        for seq in cfg.values():
            seq.sort(key=lambda r: r["round"])
    return runs


def _ms(vals: list[float]) -> str:
    vals = [v for v in vals if not math.isnan(v)]
    if not vals:
        return "—"
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    if abs(m) >= 1e4:
        return f"{_human(m)} ± {_human(s)}"
    return f"{m:.3g} ± {s:.2g}"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def plot(rows: list[dict[str, Any]], out: Path, metric_label: str, target: float) -> list[str]:
    """Four PNGs: the metric against round, top-link bytes, total bytes and simulated time
    (mean over seeds; the band is ± one std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = _by_run(rows)
    axes = [
        ("round", "round", "metric_vs_round.png"),
        ("bytes_top", "bytes on the top (global) link, cumulative", "metric_vs_top_bytes.png"),
        ("bytes_total", "bytes on all links, cumulative", "metric_vs_total_bytes.png"),
        ("sim_time_s", "simulated time (s), cumulative", "metric_vs_sim_time.png"),
    ]
    written = []
    for x_key, x_label, fname in axes:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        drawn = 0
        for config, seeds in sorted(runs.items()):
            n_rounds = min(len(s) for s in seeds.values())
            xs, ys, sd = [], [], []
            for i in range(n_rounds):
                px = [seeds[s][i][x_key] for s in seeds]
                py = [seeds[s][i]["metric"] for s in seeds]
                if any(math.isnan(v) for v in px) or any(math.isnan(v) for v in py):
                    continue
                if (
                    x_key.startswith("bytes") and statistics.fmean(px) <= 0
                ):  # round 0 has no bytes: off a log axis
                    continue
                xs.append(statistics.fmean(px))
                ys.append(statistics.fmean(py))
                sd.append(statistics.pstdev(py) if len(py) > 1 else 0.0)
            if len(xs) < 2 or (x_key != "round" and max(xs) <= 0):
                continue
            (line,) = ax.plot(xs, ys, marker="o", ms=3, label=config)
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd)],
                [y + s for y, s in zip(ys, sd)],
                color=line.get_color(),
                alpha=0.15,
            )
            drawn += 1
        ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:g}")
        if x_key.startswith("bytes"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric_label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run reported this axis", ha="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        written.append(fname)
    return written


def build(out: str | Path) -> Path:
    """(Re)write tidy.csv (from metrics/ when present), the plots and REPORT.md in ``out``."""
    out = Path(out)
    suite = load_suite(out / "suite.yaml")
    if any((out / "metrics").glob("*.jsonl")):
        rows = tidy_rows(out, suite.target_metric)
        write_tidy(rows, out / "tidy.csv")
    else:
        rows = read_tidy(out / "tidy.csv")
    status = json.loads((out / "status.json").read_text())
    machine = (
        json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else None
    )
    metric_label = (
        "mean held-out metric over tasks"
        if suite.target_metric == "mean"
        else f"held-out {suite.target_metric}"
    )
    plots = plot(rows, out, metric_label, suite.target_value)
    (out / "REPORT.md").write_text(_report(suite, rows, status, machine, plots))
    return out


def _report(
    suite: Any,
    rows: list[dict[str, Any]],
    status: list[dict[str, Any]],
    machine: dict | None,
    plots: list[str],
) -> str:
    runs = _by_run(rows)
    edges = sorted({k.split(":", 1)[1] for r in rows for k in r if k.startswith("bytes_edge:")})
    lines = [
        f"# Suite `{suite.name}`",
        "",
        suite.description,
        "",
        f"Seeds {list(suite.seeds)}; runtime `{(machine or {}).get('runtime', suite.runtime)}`; target: {suite.target_metric} >= {suite.target_value:g} "
        f"on the global held-out set. Values are mean ± std over the seeds that reached the target.",
        "",
    ]
    if machine:
        b, a = machine["before"], machine["after"]
        lines += [
            provenance(b, a, source="`before` and `after` in machine.json")
            + f" Suite wall time {machine.get('suite_wall_s', float('nan')):.0f} s.",
            "",
            shared_cpu_note(b, a),
            "",
        ]
    lines += [
        "## Time to target",
        "",
        "| configuration | reached | rounds | top-link bytes | total bytes | simulated time s |",
        "|---|---|---|---|---|---|",
    ]
    per_edge: list[str] = []
    for config, seeds in sorted(runs.items()):
        hits = {}
        for s, seq in seeds.items():
            hit = next(
                (
                    r
                    for r in seq
                    if r["round"] > 0
                    and not math.isnan(r["metric"])
                    and r["metric"] >= suite.target_value
                ),
                None,
            )
            if hit is not None:
                hits[s] = hit
        hit_rows = list(hits.values())
        lines.append(
            f"| {config} | {len(hits)}/{len(seeds)} | {_ms([h['round'] for h in hit_rows])} | {_ms([h['bytes_top'] for h in hit_rows])} | "
            f"{_ms([h['bytes_total'] for h in hit_rows])} | {_ms([h['sim_time_s'] for h in hit_rows])} |"
        )
        if hits:
            per_edge.append(
                f"| {config} | "
                + " | ".join(
                    _ms([h.get(f"bytes_edge:{e}", float("nan")) for h in hits.values()])
                    for e in edges
                )
                + " |"
            )
    if edges:
        lines += [
            "",
            "### Bytes per tier edge to reach the target",
            "",
            "| configuration | " + " | ".join(edges) + " |",
            "|---|" + "---|" * len(edges),
        ] + per_edge
    lines += [
        "",
        "## Final round",
        "",
        "| configuration | rounds | metric | top-link bytes | total bytes | simulated time s | wall s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    wall = defaultdict(list)
    for s in status:
        if s.get("status") == "ok":
            wall[s["config"]].append(s["wall_s"])
    for config, seeds in sorted(runs.items()):
        last = [seq[-1] for seq in seeds.values()]
        lines.append(
            f"| {config} | {last[0]['round']} | {_ms([r['metric'] for r in last])} | {_ms([r['bytes_top'] for r in last])} | "
            f"{_ms([r['bytes_total'] for r in last])} | {_ms([r['sim_time_s'] for r in last])} | {_ms(wall[config])} |"
        )
    tasks = sorted({k[len("metric_") :] for r in rows for k in r if k.startswith("metric_")})
    if tasks:
        lines += [
            "",
            "### Final held-out metric per task",
            "",
            "| configuration | " + " | ".join(tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for config, seeds in sorted(runs.items()):
            last = [seq[-1] for seq in seeds.values()]
            lines.append(
                f"| {config} | "
                + " | ".join(_ms([r.get(f"metric_{t}", float("nan")) for r in last]) for t in tasks)
                + " |"
            )
    other = [s for s in status if s.get("status") != "ok"]
    if other:
        lines += ["", "## Skipped or failed", ""]
        lines += [
            f"- {s['config']} (seed {s['seed']}, topology `{s['topology']}`): **{s['status']}** — {s.get('reason')}"
            for s in other
        ]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    lines += [
        "",
        "Files: `tidy.csv` (one row per configuration, seed and round; bytes cumulative), `metrics/` "
        "(hierfed's per-round metrics of every run), `status.json`, `machine.json`. Rebuild with "
        "`python -m benchmarks report <this folder>`.",
        "",
    ]
    return "\n".join(lines)
