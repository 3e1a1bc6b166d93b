"""``python -m hierfed report RUN_DIR`` for a continual run: the accuracy matrix, the
forgetting metrics per level and a plot of per-task accuracy over rounds with arrival marks
(``continual.png`` in the run folder; matplotlib, the ``plots`` extra).

Reads only files of the run folder (``continual.json``, ``metrics.jsonl``); builds no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["continual_tables", "plot_curves"]


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def continual_tables(run_dir: Path) -> list[Any]:
    """Rich tables (and one line naming the plot) for ``run_dir``'s continual.json."""
    c = json.loads((run_dir / "continual.json").read_text())
    tasks, starts, ends = c["tasks"], c["stage_starts"], c["stage_ends"]
    mat = Table(title="accuracy matrix (global model; row: after stage, column: task)")
    mat.add_column("after stage")
    for t in tasks:
        mat.add_column(f"{t} (s{c['task_stage'][t]})", justify="right")
    mat.add_row("random init", *(_fmt(c["baseline"].get(t)) for t in tasks))
    for i, vals in enumerate(c["global"]["matrix"]):
        mat.add_row(f"{i} (rounds {starts[i]}-{ends[i]})", *(_fmt(v) for v in vals))
    out: list[Any] = [mat]
    met = Table(
        title="continual metrics (ACC, BWT, FWT: Lopez-Paz & Ranzato 2017; F: Chaudhry et al. 2018)"
    )
    for col in ("level", "ACC", "BWT", "FWT", "forgetting"):
        met.add_column(col, justify="left" if col == "level" else "right")

    def row(name: str, m: dict[str, Any]) -> None:
        met.add_row(name, *(_fmt(m.get(k)) for k in ("acc", "bwt", "fwt", "forgetting")))

    row("global", c["global"])
    for name, level in sorted(c.get("tier", {}).items()):
        row(name, level)
    clients = c.get("client", {})
    if clients:
        means = {}
        for k in ("acc", "bwt", "fwt", "forgetting"):
            vals = [m[k] for m in clients.values() if m.get(k) is not None]
            means[k] = sum(vals) / len(vals) if vals else None
        row(f"clients (mean of {len(clients)})", means)
    out.append(met)
    agg = c.get("aggregation")
    if agg:
        t = Table(
            title="forgetting by aggregation (own model after local training - merged, old tasks)"
        )
        t.add_column("stage")
        t.add_column("mean", justify="right")
        t.add_column("clients", justify="right")
        for stage, a in sorted(agg["by_stage"].items()):
            t.add_row(stage, _fmt(a["mean"]), str(len(a["per_client"])))
        t.add_row("all", _fmt(agg["mean"]), "")
        out.append(t)
    png = plot_curves(run_dir, c)
    if png is not None:
        out.append(f"per-task accuracy over rounds: {png}")
    return out


def plot_curves(run_dir: Path, c: dict[str, Any] | None = None) -> Path | None:
    """``continual.png``: the global model's metric per task and round, a dashed line at
    each stage's first round (arrivals). None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    c = c or json.loads((run_dir / "continual.json").read_text())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if m.get("global")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in c["tasks"]:
        xs = [m["round"] for m in evals if t in m["global"]]
        ax.plot(xs, [m["global"][t] for m in evals if t in m["global"]], marker=".", label=t)
    for s in c["stage_starts"][1:]:
        ax.axvline(s - 0.5, color="grey", linestyle="--", linewidth=1)
    for t, s in c["task_stage"].items():
        if s > 0:
            ax.annotate(
                f"+{t}",
                (c["stage_starts"][s] - 0.5, ax.get_ylim()[1]),
                fontsize=7,
                rotation=90,
                va="top",
            )
    ax.set_xlabel("round")
    ax.set_ylabel("global model: accuracy (-MSE if regression)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = run_dir / "continual.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
