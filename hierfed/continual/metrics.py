"""Continual-learning metrics of an accuracy matrix, by their standard definitions.

``R[i][j]``: the metric (accuracy, or negative MSE for a regression task: higher is better)
on task ``j`` after the last round of stage ``i``; ``stage[j]``: the stage in which task ``j``
arrives; ``b[j]``: task ``j``'s metric under the random initialisation (round 0). With ``T``
stages and the final row ``R[T-1]`` (several tasks may share a stage):

* average accuracy  ``ACC = mean_j R[T-1][j]`` over the tasks seen by the end;
* backward transfer (Lopez-Paz & Ranzato 2017) ``BWT = mean_{j: stage[j] < T-1}
  (R[T-1][j] - R[stage[j]][j])``: negative = forgetting;
* forward transfer (same paper) ``FWT = mean_{j: stage[j] > 0} (R[stage[j]-1][j] - b[j])``:
  what earlier stages did for a task before its own data arrived;
* forgetting (Chaudhry et al. 2018) ``f_j = max_{l < T-1} R[l][j] - R[T-1][j]`` for each
  task with ``stage[j] < T-1``, and ``F = mean_j f_j``.

A metric that has no term (one stage: no BWT, no forgetting; no later task: no FWT) is
``None``. Entries of tasks not yet seen are used only by FWT (``R[stage[j]-1][j]``).

Example (two stages, one task each; hand-computed in the tests)::

    >>> m = summarize([[0.9, 0.3], [0.6, 0.8]], stage=[0, 1], baseline=[0.1, 0.2])
    >>> round(m["acc"], 6), round(m["bwt"], 6), round(m["fwt"], 6), round(m["forgetting"], 6)
    (0.7, -0.3, 0.1, 0.3)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["aggregation_forgetting", "summarize"]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def summarize(
    matrix: Sequence[Sequence[float | None]],
    *,
    stage: Sequence[int],
    baseline: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """ACC, BWT, FWT and average forgetting of ``matrix`` (rows: stages, columns: tasks),
    plus per-task forgetting ``f``. ``None`` entries (not evaluated) are skipped."""
    rows = len(matrix)
    if rows == 0:
        return {"acc": None, "bwt": None, "fwt": None, "forgetting": None, "f": {}}
    last = rows - 1
    final = matrix[last]
    seen = [j for j, s in enumerate(stage) if s <= last and final[j] is not None]
    acc = _mean([float(final[j]) for j in seen])  # type: ignore[arg-type]
    bwt, forget, fwt = [], [], []
    per_task: dict[int, float] = {}
    for j in seen:
        s = stage[j]
        if s < last and matrix[s][j] is not None:
            bwt.append(float(final[j]) - float(matrix[s][j]))  # type: ignore[arg-type]
        if s < last:
            past = [float(matrix[lv][j]) for lv in range(last) if matrix[lv][j] is not None]  # type: ignore[arg-type]
            if past:
                per_task[j] = max(past) - float(final[j])  # type: ignore[arg-type]
                forget.append(per_task[j])
    if baseline is not None:
        for j, s in enumerate(stage):
            if 0 < s <= last and matrix[s - 1][j] is not None and baseline[j] is not None:
                fwt.append(float(matrix[s - 1][j]) - float(baseline[j]))  # type: ignore[arg-type]
    return {
        "acc": acc,
        "bwt": _mean(bwt),
        "fwt": _mean(fwt),
        "forgetting": _mean(forget),
        "f": per_task,
    }


def aggregation_forgetting(
    local: dict[str, dict[str, float]], merged: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """Per client and on average: old-task metric of the client's own model right after local
    training (``local``: client -> task -> metric) minus that of the merged state it gets back
    (``merged``). Positive = aggregation pulled the client's model away from its old tasks.

    >>> aggregation_forgetting({"a": {"t": 0.8}, "b": {"t": 0.6}}, {"a": {"t": 0.7}, "b": {"t": 0.7}})
    {'per_client': {'a': 0.1, 'b': -0.1}, 'mean': 0.0}
    """
    per: dict[str, float] = {}
    for cid in sorted(local):
        diffs = [
            local[cid][t] - merged[cid][t] for t in sorted(local[cid]) if t in merged.get(cid, {})
        ]
        if diffs:
            per[cid] = round(sum(diffs) / len(diffs), 12)
    return {"per_client": per, "mean": _mean(list(per.values()))}
