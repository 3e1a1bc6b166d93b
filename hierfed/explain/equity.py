"""Equity metrics: whom the trained model serves worse.

For the final global model, on every client's held-out rows (the federation's population,
not the global test sample): the metric of each task per *unit* (the tier below the root,
e.g. an institution or an LEA, pooling its clients' rows) and per *group* (each value of
each per-row group column a dataset carries, e.g. Chem97's ``gender``), and their gaps —
max minus min, the worst unit or group with its value, the standard deviation across them.
Every metric is higher-is-better (accuracy, negative MSE), so the worst is the minimum.

Also the share of the global model's training that came from ``light`` (resource-
constrained) clients: of the sample weight behind every update a client sent up (from the
ledger), the part light clients sent, overall and per component.

``equity_summary`` is what ``simulation`` writes into ``summary.json`` (``equity``) and
``python -m hierfed report`` prints; ``equity_tables`` renders it for the CLI.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hierfed.data.federation import Federation
from hierfed.explain.rebuild import ExplainError
from hierfed.model.m3t import M3TModel

# client id -> task -> per-row scores on its test rows
Scores = dict[str, dict[str, np.ndarray]]


def unit_level(fed: Federation) -> int:
    """Tier index of the units: ``institution`` if the tree has one, else the tier below the
    root (the same grouping as the simulated clock's)."""
    names = fed.tier_names
    if "institution" in names[1:-1]:
        return names.index("institution")
    return min(1, len(names) - 1)


def unit_of(client_id: str, level: int) -> str:
    return "/".join(client_id.split("/")[: level + 1])


def client_scores(model: M3TModel, fed: Federation, batch_size: int = 256) -> Scores:
    """Per-row scores of ``model`` (as loaded) on each client's test rows, per task it serves.

    Per task, every serving client's rows are scored in one batched pass (thousands of small
    clients cost a handful of forward passes, not one each), then split back by client."""
    from hierfed.data.federation import ClientData
    from hierfed.explain.scoring import row_scores

    out: Scores = {}
    for t in sorted(fed.tasks):
        mods = fed.tasks[t].modalities
        parts = [
            (c.id, fed.test[c.id])
            for c in fed.clients
            if t in c.tasks and c.id in fed.test and len(fed.test[c.id]) > 0
        ]
        if not parts:
            continue
        joined = ClientData(
            {m: np.concatenate([d.inputs[m] for _, d in parts]) for m in mods},
            {t: np.concatenate([d.labels[t] for _, d in parts])},
        )
        scores = row_scores(model, joined, t, batch_size=batch_size)
        start = 0
        for cid, d in parts:
            out.setdefault(cid, {})[t] = scores[start : start + len(d)]
            start += len(d)
    return out


def group_columns(fed: Federation) -> list[str]:
    """The group columns every client's test rows carry."""
    cols: set[str] | None = None
    for data in fed.test.values():
        if len(data) == 0:
            continue
        cols = set(data.groups) if cols is None else cols & set(data.groups)
    return sorted(cols or ())


def check_group(fed: Federation, column: str) -> None:
    known = group_columns(fed)
    if column not in known:
        raise ExplainError(
            f"unknown group column '{column}' for dataset '{fed.name}'; "
            f"known: {', '.join(known) or 'none (this dataset carries no group column)'}"
        )


def gap(values: Mapping[str, float]) -> dict[str, Any]:
    """max - min, the worst and best entries, and the (population) standard deviation."""
    vals = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
    if not vals:
        return {"count": 0}
    arr = np.array(list(vals.values()))
    worst = min(vals, key=lambda k: (vals[k], k))
    best = max(vals, key=lambda k: (vals[k], k))
    return {
        "count": len(vals),
        "max_minus_min": float(arr.max() - arr.min()),
        "worst": worst,
        "worst_value": vals[worst],
        "best": best,
        "best_value": vals[best],
        "std": float(arr.std()),
        "mean": float(arr.mean()),
    }


def _pool(parts: Sequence[np.ndarray]) -> tuple[float, int]:
    rows = int(sum(len(p) for p in parts))
    return (float(sum(float(p.sum()) for p in parts)) / rows if rows else float("nan")), rows


def equity_metrics(
    fed: Federation, scores: Scores, *, columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-unit and per-group metrics of each task and their gaps (see the module doc)."""
    level = unit_level(fed)
    cols = group_columns(fed) if columns is None else list(columns)
    for col in cols:
        check_group(fed, col)
    by_unit: dict[str, dict[str, float]] = {}
    rows_unit: dict[str, dict[str, int]] = {}
    by_group: dict[str, dict[str, dict[str, float]]] = {col: {} for col in cols}
    tasks = sorted({t for s in scores.values() for t in s})
    for t in tasks:
        parts: dict[str, list[np.ndarray]] = {}
        gparts: dict[str, dict[str, list[np.ndarray]]] = {col: {} for col in cols}
        for cid in sorted(scores):
            if t not in scores[cid]:
                continue
            s = scores[cid][t]
            parts.setdefault(unit_of(cid, level), []).append(s)
            for col in cols:
                labels = np.asarray(fed.test[cid].groups[col]).astype(str)
                for v in np.unique(labels):
                    gparts[col].setdefault(str(v), []).append(s[labels == v])
        pooled = {u: _pool(p) for u, p in sorted(parts.items())}
        by_unit[t] = {u: m for u, (m, _) in pooled.items()}
        rows_unit[t] = {u: n for u, (_, n) in pooled.items()}
        for col in cols:
            by_group[col][t] = {v: _pool(p)[0] for v, p in sorted(gparts[col].items())}
    gaps: dict[str, dict[str, Any]] = {"unit": {t: gap(by_unit[t]) for t in tasks}}
    for col in cols:
        gaps[f"group:{col}"] = {t: gap(by_group[col][t]) for t in tasks}
    return {
        "unit_tier": fed.tier_names[level],
        "metric": {t: fed.tasks[t].metric for t in tasks},
        "by_unit": by_unit,
        "rows_by_unit": rows_unit,
        "by_group": by_group,
        "gaps": gaps,
    }


def light_share(fed: Federation, ledger: Any) -> dict[str, Any]:
    """Of the sample weight behind all client uploads (one per client-round, from the
    ledger's ``up`` records), the share light clients sent, overall and per component."""
    profiles = fed.by_id
    light = {cid for cid, p in profiles.items() if p.resource == "light"}
    sent: dict[tuple[int, str], set[str]] = {}
    for r in ledger.records:
        if r.direction == "up" and r.src in profiles:
            sent.setdefault((r.round, r.src), set()).add(r.component)
    total = lit = 0.0
    comp_total: dict[str, float] = {}
    comp_light: dict[str, float] = {}
    for (_rnd, cid), comps in sent.items():
        n = float(profiles[cid].num_train)
        total += n
        lit += n if cid in light else 0.0
        for c in comps:
            comp_total[c] = comp_total.get(c, 0.0) + n
            comp_light[c] = comp_light.get(c, 0.0) + (n if cid in light else 0.0)
    return {
        "light_clients": len(light),
        "clients": len(profiles),
        "light_population_share": (
            sum(profiles[c].num_train for c in light)
            / max(1, sum(p.num_train for p in profiles.values()))
        ),
        "light_training_share": lit / total if total else 0.0,
        "light_training_share_by_component": {
            c: comp_light[c] / comp_total[c] for c in sorted(comp_total) if comp_total[c] > 0
        },
    }


def personalized_by_unit(
    fed: Federation, personalized: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """Personalized metrics pooled per unit (weighted by each client's test rows), with gaps."""
    level = unit_level(fed)
    acc: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for cid, res in personalized.items():
        n = fed.by_id[cid].num_test if cid in fed.by_id else 0
        for t, m in res.items():
            if m is not None and math.isfinite(float(m)) and n > 0:
                acc.setdefault(t, {}).setdefault(unit_of(cid, level), []).append((float(m), n))
    by_unit = {
        t: {u: sum(m * n for m, n in v) / sum(n for _, n in v) for u, v in sorted(units.items())}
        for t, units in sorted(acc.items())
    }
    return {"by_unit": by_unit, "gaps": {t: gap(v) for t, v in by_unit.items()}}


def equity_summary(
    cfg: Any,
    fed: Federation,
    final: Mapping[str, Mapping[str, Any]],
    ledger: Any,
    personalized: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """The ``equity`` entry of a run's ``summary.json``: the final global model rebuilt on the
    driver (``hierfed.explain.rebuild``) and scored on every client's test rows."""
    from hierfed.explain.rebuild import rebuild

    built = rebuild(cfg, fed, {c: dict(p) for c, p in final.items()})
    scores = client_scores(built.model, built.federation, cfg.eval.batch_size)
    out = equity_metrics(built.federation, scores)
    out["light"] = light_share(fed, ledger)
    if personalized:
        out["personalized"] = personalized_by_unit(fed, personalized)
    return out


def equity_tables(eq: Mapping[str, Any]) -> list[Any]:
    """Rich tables of an ``equity`` summary entry (the CLI prints them)."""
    from rich.table import Table

    tables = []
    t = Table(title=f"equity: final global model per {eq.get('unit_tier', 'unit')} and group")
    for col in ("task", "over", "count", "worst", "worst value", "max - min", "std"):
        t.add_column(col)
    for over, per_task in sorted(eq.get("gaps", {}).items()):
        for task, g in sorted(per_task.items()):
            if not g.get("count"):
                continue
            t.add_row(
                task,
                eq.get("unit_tier", "unit") if over == "unit" else over.split(":", 1)[1],
                str(g["count"]),
                str(g["worst"]).split("/")[-1],
                f"{g['worst_value']:.3f}",
                f"{g['max_minus_min']:.3f}",
                f"{g['std']:.3f}",
            )
    tables.append(t)
    light = eq.get("light")
    if light:
        lt = Table(title="light (resource-constrained) clients")
        lt.add_column("light clients")
        lt.add_column("share of training rows")
        lt.add_column("share of the training behind the model")
        lt.add_row(
            f"{light['light_clients']} / {light['clients']}",
            f"{light['light_population_share']:.3f}",
            f"{light['light_training_share']:.3f}",
        )
        tables.append(lt)
    return tables
