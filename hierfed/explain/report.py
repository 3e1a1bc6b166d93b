"""``python -m hierfed explain RUN_DIR``: tables (JSON and CSV) and plots (PNG) of a run.

Writes into ``RUN_DIR/explain/`` (or ``--out``):

* ``attribution.json|csv``: per task and modality, the signed mean attribution and the mean
  share (overall and per unit), with the largest completeness error (hierfed.explain.attribution);
* ``ablation.json|csv``: per component and task, the metric drop when the component is put
  back to its untrained value (overall and per unit);
* ``equity.json|csv``: per unit and per group metrics of the final model and their gaps
  (hierfed.explain.equity);
* ``attribution.png``, ``ablation.png``, ``equity.png`` (matplotlib, the ``bench`` extra).

Attribution and ablation use at most ``max_rows`` keyed-sampled test rows per client
(attribution costs ``n_steps`` forward and backward passes per row); equity uses them all.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hierfed.checkpoint import atomic_write_text, nulled
from hierfed.data.federation import ClientData
from hierfed.data.partition import take
from hierfed.explain.attribution import (
    component_ablation,
    modality_attribution,
    pooled,
    summarize_attribution,
)
from hierfed.explain.equity import (
    check_group,
    client_scores,
    equity_metrics,
    group_columns,
    unit_level,
    unit_of,
)
from hierfed.explain.rebuild import ExplainError, Rebuilt, load_run
from hierfed.seeding import np_rng


def sample_rows(built: Rebuilt, max_rows: int) -> dict[str, ClientData]:
    """Each client's test rows, at most ``max_rows`` of them (a keyed sample)."""
    out = {}
    for c in built.federation.clients:
        data = built.federation.test.get(c.id)
        if data is None or len(data) == 0:
            continue
        if len(data) > max_rows:
            rng = np_rng(built.cfg.seed, "explain", c.id)
            data = take(data, np.sort(rng.choice(len(data), size=max_rows, replace=False)))
        out[c.id] = data
    return out


def attribution_report(
    built: Rebuilt, rows: dict[str, ClientData], *, n_steps: int
) -> dict[str, Any]:
    level = unit_level(built.federation)
    profiles = built.federation.by_id
    per: dict[str, dict[str, dict[str, np.ndarray]]] = {}  # task -> modality -> cid -> rows
    worst_delta: dict[str, float] = {}
    for cid, data in rows.items():
        for t in profiles[cid].tasks:
            attrs, delta = modality_attribution(built.model, data, t, n_steps=n_steps)
            for m, a in attrs.items():
                per.setdefault(t, {}).setdefault(m, {})[cid] = a
            worst_delta[t] = max(worst_delta.get(t, 0.0), float(np.abs(delta).max(initial=0.0)))
    out: dict[str, Any] = {}
    for t, by_mod in sorted(per.items()):
        cids = sorted(next(iter(by_mod.values())))
        scopes: dict[str, list[str]] = {"all": cids}
        for cid in cids:
            scopes.setdefault(unit_of(cid, level), []).append(cid)
        out[t] = {
            "completeness_error_max": worst_delta[t],
            "rows": int(sum(len(by_mod[next(iter(by_mod))][c]) for c in cids)),
            "by_scope": {
                scope: summarize_attribution(
                    {m: np.concatenate([by_mod[m][c] for c in members]) for m in by_mod}
                )
                for scope, members in scopes.items()
            },
        }
    return out


def ablation_report(built: Rebuilt, rows: dict[str, ClientData]) -> dict[str, Any]:
    level = unit_level(built.federation)
    profiles = built.federation.by_id
    drops = component_ablation(
        built.model,
        built.final,
        built.initial,
        rows,
        {cid: profiles[cid].tasks for cid in rows},
        batch_size=built.cfg.eval.batch_size,
    )
    return {c: pooled(per, lambda cid: unit_of(cid, level)) for c, per in drops.items()}


def _write_csv(path: Path, header: Sequence[str], rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _json(obj: Any) -> str:
    return json.dumps(nulled(obj), indent=1, sort_keys=True)


def explain_run(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    groups: Sequence[str] | None = None,
    max_rows: int = 32,
    n_steps: int = 32,
    plots: bool = True,
) -> Path:
    """Write the explain tables (and plots) of a finished run; returns the folder."""
    if max_rows < 1:
        raise ExplainError(f"--max-rows {max_rows}: give at least 1 row per client")
    if n_steps < 2:
        raise ExplainError(f"--steps {n_steps}: Integrated Gradients needs at least 2 steps")
    built = load_run(run_dir)
    fed = built.federation
    for g in groups or ():
        check_group(fed, g)
    dest = Path(out) if out is not None else Path(run_dir) / "explain"
    dest.mkdir(parents=True, exist_ok=True)

    eq = equity_metrics(
        fed, client_scores(built.model, fed, built.cfg.eval.batch_size), columns=groups
    )
    rows = sample_rows(built, max_rows)
    attr = attribution_report(built, rows, n_steps=n_steps)
    abl = ablation_report(built, rows)

    atomic_write_text(dest / "equity.json", _json(eq))
    atomic_write_text(dest / "attribution.json", _json(attr))
    atomic_write_text(dest / "ablation.json", _json(abl))
    _write_csv(
        dest / "equity.csv",
        ["over", "task", "name", "metric", "value"],
        [
            [eq["unit_tier"], t, u, eq["metric"][t], v]
            for t, us in eq["by_unit"].items()
            for u, v in us.items()
        ]
        + [
            [f"group:{col}", t, g, eq["metric"][t], v]
            for col, per in eq["by_group"].items()
            for t, gs in per.items()
            for g, v in gs.items()
        ],
    )
    _write_csv(
        dest / "attribution.csv",
        ["task", "scope", "modality", "mean", "share"],
        [
            [t, scope, m, s["mean"], s["share"]]
            for t, r in attr.items()
            for scope, mods in r["by_scope"].items()
            for m, s in mods.items()
        ],
    )
    _write_csv(
        dest / "ablation.csv",
        ["component", "task", "scope", "metric_drop"],
        [
            [c, t, scope, v]
            for c, per in abl.items()
            for t, scopes in per.items()
            for scope, v in scopes.items()
        ],
    )
    if plots:
        _plots(dest, eq, attr, abl)
    return dest


def _save(fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it at the resolution of every explain plot, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plots(dest: Path, eq: dict[str, Any], attr: dict[str, Any], abl: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ExplainError(
            "plots need matplotlib (pip install 'hierfed[bench]'); or pass --no-plots"
        ) from None
    tasks = sorted(attr)
    mods = sorted({m for t in tasks for m in attr[t]["by_scope"]["all"]})
    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(tasks)), 3.2))
    bottom = np.zeros(len(tasks))
    for m in mods:
        vals = np.array([attr[t]["by_scope"]["all"].get(m, {}).get("share", 0.0) for t in tasks])
        ax.bar(tasks, vals, bottom=bottom, label=m)
        bottom += vals
    ax.set_ylabel("mean |attribution| share")
    ax.set_title("what each task's prediction rests on (Integrated Gradients)")
    ax.legend(fontsize=8)
    _save(fig, dest / "attribution.png")

    comps = sorted(abl)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(comps) * max(1, len(tasks)) / 2), 3.4))
    width = 0.8 / max(1, len(tasks))
    for k, t in enumerate(tasks):
        drops = [abl[c].get(t, {}).get("all", 0.0) for c in comps]
        ax.bar(np.arange(len(comps)) + k * width, drops, width, label=t)
    ax.set_xticks(np.arange(len(comps)) + 0.4 - width / 2)
    ax.set_xticklabels(comps, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("metric drop when untrained")
    ax.set_title("component ablation")
    ax.legend(fontsize=7)
    _save(fig, dest / "ablation.png")

    etasks = sorted(eq["by_unit"])
    units = sorted({u for t in etasks for u in eq["by_unit"][t]})
    fig, axes = plt.subplots(
        1, len(etasks), figsize=(max(4, 0.35 * len(units)) * len(etasks), 3.4), squeeze=False
    )
    for ax, t in zip(axes[0], etasks):
        metric = [eq["by_unit"][t].get(u, np.nan) for u in units]
        ax.bar(np.arange(len(units)), metric)
        ax.set_xticks(np.arange(len(units)))
        ax.set_xticklabels([u.split("/")[-1] for u in units], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{t} ({eq['metric'][t]}) per {eq['unit_tier']}", fontsize=9)
    _save(fig, dest / "equity.png")


__all__ = ["explain_run", "group_columns"]
