"""Stage-end evaluations of a continual run and its ``continual.json``.

After the last round of every stage (``Schedule.stage_ends``) the run adds a ``continual``
entry to that round's line in metrics.jsonl (so it is checkpointed and resumed with the rest):

* ``global``: the global model on the global test set, every task (tasks not yet seen use
  their components' initial values: that row entry is what FWT reads);
* ``tier``: each node of the tier below the root, with its state (the root's components and
  its own tier-scoped ones), on the test rows of its clients, row-weighted;
* ``client``: each client's personalized model on its own test rows, each of its tasks
  (one not yet arrived with its initial components); after stage 0 also ``baseline``: the
  initial model on the same rows, per client and tier node (their FWT's ``b_j``);
* ``aggregation`` (from the second stage on): each client that trained in the round, its old
  tasks (arrived in an earlier stage) on its test rows, with its own model right after local
  training in that round versus the merged state it gets back. The local model is recomputed
  from the state it started the round from, with the round's own keys: exact for trees whose
  inner tiers run one local round and merge by a weighted mean (the default).

At the end, ``continual.json`` holds the accuracy matrices (rows: stages, columns: tasks in
order of arrival) with ACC, BWT, FWT and forgetting (``hierfed.continual.metrics``) per level;
summary.json gets the global ones and the mean aggregation forgetting.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hierfed.config import RunConfig
from hierfed.continual.metrics import aggregation_forgetting, summarize
from hierfed.continual.schedule import Schedule, continual_on
from hierfed.data.federation import Federation
from hierfed.postprocess.validate import Expectation
from hierfed.runtime.jobs import EvalJob, MergeTask, TrainJob
from hierfed.update import State

__all__ = ["Recorder", "write_continual"]


class Recorder:
    """Stage-end evaluations of one run (driver side; uses only the Runtime interface)."""

    def __init__(self, cfg: RunConfig, fed: Federation) -> None:
        self.cfg, self.fed = cfg, fed
        self.schedule = Schedule(cfg, fed)
        self.ends = self.schedule.stage_ends()

    @classmethod
    def make(cls, cfg: RunConfig, fed: Federation) -> Recorder | None:
        return cls(cfg, fed) if continual_on(cfg) else None

    def before_round(self, rnd: int, topo: Any) -> dict[str, State] | None:
        """At a probed stage end: every client's state at the start of the round."""
        if not self._probed(rnd):
            return None
        topo.engine.continual.enter_round(rnd)  # this round's scopes and components (idempotent)
        return {c.id: topo.personalized_state(c.id) for c in self.fed.clients}

    def _probed(self, rnd: int) -> bool:
        return self.cfg.continual.levels and rnd in self.ends and self.ends.index(rnd) > 0

    def after_round(
        self, rnd: int, topo: Any, rt: Any, snap: dict[str, State] | None
    ) -> dict[str, Any] | None:
        """The round's ``continual`` entry (None when ``rnd`` ends no stage)."""
        if rnd not in self.ends:
            return None
        stage = self.ends.index(rnd)
        out: dict[str, Any] = {"stage": stage, "global": _global(rt, topo, self.fed)}
        if not self.cfg.continual.levels:
            return out
        sch, eng = self.schedule, topo.engine
        # every task of each client that has joined by now; a task not yet arrived is scored
        # with its initial components (what forward transfer reads)
        had = {
            c.id: c.tasks
            for c in self.fed.clients
            if c.num_test and any(sch.present(c.id, r) for r in range(1, rnd + 1))
        }
        states = {c: topo.personalized_state(c) for c in had}
        res = dict(rt.evaluate([EvalJob(c, had[c], c, split="client-test") for c in had], states))
        out["client"] = {c: {t: m for t, (m, _) in r.items()} for c, r in sorted(res.items())}
        tier_states = {n: node_state(eng, n) for n in _tier_nodes(eng)}
        jobs = [
            EvalJob(c, had[c], _ancestor(eng, c), split="client-test")
            for c in had
            if _ancestor(eng, c) in tier_states
        ]
        node_of = {j.name: j.state_key for j in jobs}
        out["tier"] = _pooled(rt.evaluate(jobs, tier_states), node_of)
        if stage == 0:  # the random-init baseline b_j of every client and tier node (FWT)
            init = [EvalJob(c, self.fed.by_id[c].tasks, "init", split="client-test") for c in had]
            res0 = rt.evaluate(init, {"init": dict(eng.initial)})
            out["baseline"] = {
                "client": {c: {t: m for t, (m, _) in r.items()} for c, r in res0},
                "tier": _pooled([x for x in res0 if x[0] in node_of], node_of),
            }
        if snap is not None:
            out["aggregation"] = self._probe(rnd, stage, topo, rt, snap, states)
        return out

    def _probe(
        self,
        rnd: int,
        stage: int,
        topo: Any,
        rt: Any,
        snap: dict[str, State],
        merged: Mapping[str, State],
    ) -> dict[str, Any]:
        eng, sch = topo.engine, self.schedule
        old = {
            c: tuple(t for t in sch.tasks_at(c, rnd, started=True) if sch.task_stage[t] < stage)
            for c in eng.leaves
        }
        who = [c for c in eng.leaves if c not in eng.excluded and old[c] and c in merged]
        if not who:
            return aggregation_forgetting({}, {})
        tier = eng.nodes[eng.graph.parent(who[0])].tier
        level = eng.graph.leaf_level
        jobs = [
            TrainJob(
                c,
                c,
                tier,
                rnd,
                (rnd, 0, c),
                eng.trains[c],
                eng.sends_up(eng.trains[c], level),
                local=topo.clients.local.get(c),
                continual=eng.continual.fit(c, rnd),
            )
            for c in who
        ]
        metas, updates = rt.train(jobs, rt.put({c: snap[c] for c in who}))
        tasks = [
            MergeTask(
                c,
                tier,
                rnd,
                (rnd, "continual-probe"),
                (
                    Expectation(
                        c, frozenset(j.sends), exact=True, max_weight=eng.nodes[c].max_weight
                    ),
                ),
                snap[c],
            )
            for c, j in zip(who, jobs)
        ]
        ok = {m.client_id for m in metas if m.error is None}
        local = {r.node_id: r.state for r in rt.merge(tasks, [updates]) if r.node_id in ok}
        for m in metas:
            if m.local and m.client_id in local:
                local[m.client_id] = {**local[m.client_id], **m.local}
        probe = [c for c in who if c in local and self.fed.by_id[c].num_test]
        ev = [EvalJob(c, old[c], c, split="client-test") for c in probe]
        mine = {c: {t: m for t, (m, _) in r.items()} for c, r in rt.evaluate(ev, local)}
        got = {c: {t: m for t, (m, _) in r.items()} for c, r in rt.evaluate(ev, dict(merged))}
        return aggregation_forgetting(mine, got)


def _global(rt: Any, topo: Any, fed: Federation) -> dict[str, float]:
    jobs = [EvalJob("global", tuple(sorted(fed.tasks)), "global")]
    return {
        t: m
        for _, r in rt.evaluate(jobs, {"global": topo.global_state()})
        for t, (m, _) in r.items()
    }


def _tier_nodes(eng: Any) -> list[str]:
    """The nodes of the tier below the root (none in a star)."""
    if eng.graph.leaf_level <= 1:
        return []
    return sorted(n for n, node in eng.nodes.items() if node.level == 1)


def _ancestor(eng: Any, cid: str) -> str:
    anc = eng.graph.ancestors(cid)  # parent first, root last
    return anc[-2] if len(anc) >= 2 else anc[-1]


def node_state(eng: Any, nid: str) -> State:
    """Tier node ``nid``'s model: the root's components, its own (and ancestors') tier-scoped ones."""
    state = dict(eng.global_state())
    chain = [*reversed(eng.graph.ancestors(nid)[:-1]), nid] if eng.nodes[nid].level > 0 else []
    for n in chain:
        lvl = eng.nodes[n].level
        for c in state:
            if eng.level_of(c) >= lvl and c in eng.states[n]:
                state[c] = eng.states[n][c]
    return state


def _pooled(
    results: Sequence[tuple[str, dict[str, tuple[float, int]]]], node_of: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Row-weighted metric per tier node and task from per-client results."""
    sums: dict[str, dict[str, list[float]]] = {}
    for cid, res in results:
        acc = sums.setdefault(node_of[cid], {})
        for t, (m, rows) in res.items():
            s = acc.setdefault(t, [0.0, 0.0])
            s[0] += m * rows
            s[1] += rows
    return {
        n: {t: s / r for t, (s, r) in sorted(acc.items()) if r} for n, acc in sorted(sums.items())
    }


def matrices(
    cfg: RunConfig, fed: Federation, metrics: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The accuracy matrices and their metrics, from the run's metrics lines."""
    sch = Schedule(cfg, fed)
    order = sorted(fed.tasks, key=lambda t: (sch.task_stage[t], t))
    stage = [sch.task_stage[t] for t in order]
    recs = [m["continual"] for m in metrics if m.get("continual")]
    base0: Mapping[str, Any] = next(
        (m.get("global", {}) for m in metrics if m.get("round") == 0), {}
    )
    baseline = [base0.get(t) for t in order]

    def level(rows: list[Mapping[str, float]], base: list[Any] | None) -> dict[str, Any]:
        mat = [[r.get(t) for t in order] for r in rows]
        s = summarize(mat, stage=stage, baseline=base)
        s["f"] = {order[j]: v for j, v in s["f"].items()}
        return {"matrix": mat, **s}

    out: dict[str, Any] = {
        "tasks": order,
        "task_stage": dict(zip(order, stage)),
        "stage_starts": list(sch.stage_starts),
        "stage_ends": list(sch.stage_ends()),
        "baseline": dict(zip(order, baseline)),
        "global": level([r["global"] for r in recs], baseline),
    }
    for name in ("tier", "client"):
        ids = sorted({i for r in recs for i in r.get(name, {})})
        if ids:
            bases = recs[0].get("baseline", {}).get(name, {}) if recs else {}
            out[name] = {
                i: level(
                    [r.get(name, {}).get(i, {}) for r in recs],
                    [bases[i].get(t) for t in order] if i in bases else None,
                )
                for i in ids
            }
    agg = {str(r["stage"]): r["aggregation"] for r in recs if "aggregation" in r}
    if agg:
        means = [a["mean"] for a in agg.values() if a["mean"] is not None]
        out["aggregation"] = {
            "by_stage": agg,
            "mean": sum(means) / len(means) if means else None,
        }
    return out


def write_continual(
    out_dir: Path, cfg: RunConfig, fed: Federation, metrics: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Write ``continual.json``; returns the part summary.json carries."""
    from hierfed.checkpoint import atomic_write_text

    full = matrices(cfg, fed, metrics)
    atomic_write_text(out_dir / "continual.json", json.dumps(full, indent=1, sort_keys=True))
    g = full["global"]
    return {k: g[k] for k in ("acc", "bwt", "fwt", "forgetting")} | {
        "aggregation_forgetting": full.get("aggregation", {}).get("mean")
    }
