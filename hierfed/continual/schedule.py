"""The continual schedule: which tasks, modalities and clients exist in which round.

A pure function of the round (and the config and federation), so a resumed run replays it
exactly. ``continual.tasks`` / ``continual.modalities`` give each name a *data window*:
``N`` (from round N to the end) or ``[N, M]`` (from round N until before round M). A name not
listed has data in every round. ``continual.nodes`` overrides windows for the clients below a
tier node or for one client (the most specific id wins, name by name); ``join`` / ``leave``
say from which round a node or client takes part and from which round it no longer does.

In round ``r`` a client:

* *is present* when every id on its path has joined and none has left;
* *trains* the tasks whose window contains ``r`` and whose modalities' windows all do;
* *holds* (receives and sends) the components of those tasks and modalities, as
  ``ModelSpec.holds`` picks them, plus its ``local`` components of tasks it has had before.

A component *exists* from the first round a present client holds it: node states grow it then,
from its seed-initialised value, and until then it is neither stored nor sent.

The *stages* of the run are the distinct first rounds of the top-level task windows (round 1
always starts one): the accuracy matrix has a row after the last round of each stage.

Example::

    >>> w = parse_window("continual.tasks.t", [2, 5], rounds=8)
    >>> (w.start, w.end, 4 in w, 5 in w)
    (2, 5, True, False)
    >>> parse_window("continual.tasks.t", 3, rounds=8).end is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from hierfed.config_schema import ContinualConfig, RunConfig
from hierfed.data.federation import ClientProfile, Federation
from hierfed.errors import ConfigError
from hierfed.model.spec import ModelSpec

__all__ = ["Schedule", "Window", "continual_on", "parse_window"]


def continual_on(cfg: RunConfig) -> bool:
    """Whether the run is continual (any schedule or mitigation set). The batched trainer
    (``hierfed/batched``) and DP-SGD paths must refuse a run for which this is true."""
    c = cfg.continual
    return bool(
        c.tasks
        or c.modalities
        or c.nodes
        or c.join
        or c.leave
        or c.freeze_old
        or c.old_scope
        or c.ewc
        or c.replay
    )


@dataclass(frozen=True)
class Window:
    """Data from round ``start`` until before ``end`` (None: to the end of the run)."""

    start: int = 1
    end: int | None = None

    def __contains__(self, rnd: object) -> bool:
        return isinstance(rnd, int) and self.start <= rnd and (self.end is None or rnd < self.end)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_window(key: str, value: Any, *, rounds: int) -> Window:
    """``N`` or ``[N]`` or ``[N, M]`` as a Window; ConfigError naming ``key`` otherwise."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(vals) > 2:
        raise ConfigError(
            key,
            vals,
            "a name has one data window [first, until); a task or modality that disappears "
            "and returns is not supported: give the second period its own task name",
        )
    if not vals or not all(_is_int(v) for v in vals):
        raise ConfigError(key, value, "give the first round N, or [N, M] (data until before M)")
    start = int(vals[0])
    if not 1 <= start <= rounds:
        raise ConfigError(key, value, f"the first round must lie in 1..rounds ({rounds})")
    end = int(vals[1]) if len(vals) == 2 else None
    if end is not None and not start < end <= rounds + 1:
        raise ConfigError(
            key,
            value,
            f"[N, M] needs N < M <= rounds + 1 ({rounds + 1}); M is the first round without data",
        )
    return Window(start, end)


def _round(key: str, value: Any, rounds: int) -> int:
    if not _is_int(value) or not 1 <= value <= rounds:
        raise ConfigError(key, value, f"give a round in 1..rounds ({rounds})")
    return int(value)


def _windows(key: str, table: Any, rounds: int) -> dict[str, Window]:
    if not isinstance(table, Mapping):
        raise ConfigError(key, table, "give a mapping name -> window, e.g. {essay_topic: [1, 5]}")
    return {str(k): parse_window(f"{key}.{k}", v, rounds=rounds) for k, v in table.items()}


def check_syntax(cfg: RunConfig) -> None:
    """What needs no federation: window shapes, rounds inside the run, mitigation values."""
    c: ContinualConfig = cfg.continual
    _windows("continual.tasks", c.tasks, cfg.rounds)
    _windows("continual.modalities", c.modalities, cfg.rounds)
    for node, over in c.nodes.items():
        if not isinstance(over, Mapping) or set(over) - {"tasks", "modalities"}:
            raise ConfigError(
                f"continual.nodes.{node}",
                over,
                "give {tasks: {...}, modalities: {...}} (windows for the clients below it)",
            )
        for part in ("tasks", "modalities"):
            _windows(f"continual.nodes.{node}.{part}", over.get(part, {}), cfg.rounds)
    for name in ("join", "leave"):
        for node, rnd in getattr(c, name).items():
            _round(f"continual.{name}.{node}", rnd, cfg.rounds)
    for node in set(c.join) & set(c.leave):
        if c.leave[node] <= c.join[node]:
            raise ConfigError(
                f"continual.leave.{node}",
                c.leave[node],
                f"it joins in round {c.join[node]}; leave must come after join (rejoining is "
                "not supported)",
            )
    if not (isinstance(c.ewc, (int, float)) and not isinstance(c.ewc, bool) and c.ewc >= 0):
        raise ConfigError("continual.ewc", c.ewc, "give the EWC strength lambda >= 0 (0 = off)")
    if not _is_int(c.memory) or c.memory < 1:
        raise ConfigError("continual.memory", c.memory, "give the rows kept per old task, >= 1")


class Schedule:
    """The parsed schedule of one run over one federation (checked: ConfigError otherwise)."""

    def __init__(self, cfg: RunConfig, federation: Federation) -> None:
        check_syntax(cfg)
        c = cfg.continual
        self.cfg, self.fed, self.rounds = cfg, federation, cfg.rounds
        self.tasks = _windows("continual.tasks", c.tasks, cfg.rounds)
        self.modalities = _windows("continual.modalities", c.modalities, cfg.rounds)
        ids = _node_ids(federation)
        self._check_names("continual.tasks", self.tasks, federation.tasks)
        self._check_names("continual.modalities", self.modalities, federation.modalities)
        self.nodes: dict[str, tuple[dict[str, Window], dict[str, Window]]] = {}
        for node, over in c.nodes.items():
            self._check_node(f"continual.nodes.{node}", node, ids)
            t = _windows(f"continual.nodes.{node}.tasks", over.get("tasks", {}), cfg.rounds)
            m = _windows(
                f"continual.nodes.{node}.modalities", over.get("modalities", {}), cfg.rounds
            )
            self._check_names(f"continual.nodes.{node}.tasks", t, federation.tasks)
            self._check_names(f"continual.nodes.{node}.modalities", m, federation.modalities)
            self.nodes[node] = (t, m)
        for name in ("join", "leave"):
            for node in getattr(c, name):
                self._check_node(f"continual.{name}.{node}", node, ids)
        self.join, self.leave = dict(c.join), dict(c.leave)
        starts = {1} | {w.start for w in self.tasks.values()}
        #: first round of each stage, ascending
        self.stage_starts: tuple[int, ...] = tuple(sorted(starts))
        #: task -> its stage (index into stage_starts), by the top-level window
        self.task_stage = {
            t: self.stage_starts.index(self.tasks[t].start if t in self.tasks else 1)
            for t in sorted(federation.tasks)
        }
        self.profiles = federation.by_id

    # ---------------------------------------------------------------- checks

    @staticmethod
    def _check_names(key: str, table: Mapping[str, Window], known: Mapping[str, Any]) -> None:
        for name in table:
            if name not in known:
                raise ConfigError(
                    f"{key}.{name}", name, f"no such name here; known: {sorted(known)}"
                )

    @staticmethod
    def _check_node(key: str, node: str, ids: set[str]) -> None:
        if node not in ids:
            example = sorted(ids)[:2]
            raise ConfigError(
                key,
                node,
                f"no tier node or client has this id; ids are tier paths such as {example}",
            )

    # ---------------------------------------------------------------- per client, per round

    def _window(self, cid: str, part: int, name: str) -> Window:
        """The window of task (part 0) or modality (part 1) ``name`` for client ``cid``."""
        path = cid.split("/")
        for i in range(len(path), 0, -1):  # the most specific id first
            over = self.nodes.get("/".join(path[:i]))
            if over is not None and name in over[part]:
                return over[part][name]
        top = self.tasks if part == 0 else self.modalities
        return top.get(name, Window())

    def present(self, cid: str, rnd: int) -> bool:
        path = cid.split("/")
        for i in range(1, len(path) + 1):
            nid = "/".join(path[:i])
            if self.join.get(nid, 1) > rnd or self.leave.get(nid, self.rounds + 1) <= rnd:
                return False
        return True

    def modalities_at(self, cid: str, rnd: int, *, started: bool = False) -> tuple[str, ...]:
        """The client's modalities with data in ``rnd`` (``started``: that have begun by then)."""
        out = []
        for m in self.profiles[cid].modalities:
            w = self._window(cid, 1, m)
            if (w.start <= rnd) if started else (rnd in w):
                out.append(m)
        return tuple(out)

    def tasks_at(self, cid: str, rnd: int, *, started: bool = False) -> tuple[str, ...]:
        """The client's tasks it trains in ``rnd`` (``started``: it has had by then)."""
        mods = set(self.modalities_at(cid, rnd, started=started))
        out = []
        for t in self.profiles[cid].tasks:
            w = self._window(cid, 0, t)
            ok = (w.start <= rnd) if started else (rnd in w)
            if ok and set(self.fed.tasks[t].modalities) <= mods:
                out.append(t)
        return tuple(out)

    def old_tasks(self, cid: str, rnd: int) -> tuple[str, ...]:
        """Tasks the client had before whose data window has closed by ``rnd``."""
        now = set(self.tasks_at(cid, rnd))
        return tuple(t for t in self.tasks_at(cid, rnd, started=True) if t not in now)

    def last_close(self, cid: str, rnd: int) -> int:
        """The latest round <= ``rnd`` at which one of the client's task windows closed (0: none)."""
        ends = [
            w.end
            for t in self.tasks_at(cid, rnd, started=True)
            if (w := self._window(cid, 0, t)).end is not None and w.end <= rnd
        ]
        return max(ends, default=0)

    def trains(self, cid: str, rnd: int) -> bool:
        """Present and with at least one task with data: the client takes part in ``rnd``."""
        return self.present(cid, rnd) and bool(self.tasks_at(cid, rnd))

    def holds(self, spec: ModelSpec, cid: str, rnd: int) -> tuple[str, ...]:
        """The components client ``cid`` receives, trains and sends in ``rnd``."""
        profile = self.profiles[cid]
        now = spec.holds(_restrict(profile, self.tasks_at(cid, rnd), self.modalities_at(cid, rnd)))
        had = spec.holds(
            _restrict(
                profile,
                self.tasks_at(cid, rnd, started=True),
                self.modalities_at(cid, rnd, started=True),
            )
        )
        # a local component of a task the client no longer trains stays with it (kept, unchanged)
        keep = [c for c in had if c not in now and spec.components[c].scope == "local"]
        return tuple(sorted((*now, *keep)))

    def components(self, spec: ModelSpec, rnd: int) -> frozenset[str]:
        """Components that exist in ``rnd``: held, now or before, by a client that has joined."""
        out: set[str] = set()
        for cid, profile in self.profiles.items():
            if not any(self.present(cid, r) for r in range(1, rnd + 1)):
                continue
            tasks = self.tasks_at(cid, rnd, started=True)
            mods = self.modalities_at(cid, rnd, started=True)
            out.update(spec.holds(_restrict(profile, tasks, mods)))
        return frozenset(out)

    def old_components(self, rnd: int) -> frozenset[str]:
        """Heads and prompts of tasks of an earlier stage than ``rnd``'s."""
        now = self.stage_of_round(rnd)
        return frozenset(
            f"{kind}.{t}"
            for t, s in self.task_stage.items()
            if s < now
            for kind in ("head", "prompt")
        )

    def frozen(self, rnd: int) -> frozenset[str]:
        """With ``freeze_old``: the old components (``old_components``), trained by no one."""
        return self.old_components(rnd) if self.cfg.continual.freeze_old else frozenset()

    def spec_at(self, spec: ModelSpec, rnd: int) -> ModelSpec:
        """``spec`` with the old components scoped to ``continual.old_scope`` (when set and
        narrower than theirs) from ``rnd`` on."""
        tier = self.cfg.continual.old_scope
        if not tier:
            return spec
        scope = "local" if tier == spec.tier_names[-1] else tier
        level = len(spec.tier_names) - 1 if scope == "local" else spec.tier_names.index(scope)
        old = self.old_components(rnd)
        comps = {
            name: replace(c, scope=scope) if name in old and spec.scope_level(name) < level else c
            for name, c in spec.components.items()
        }
        return replace(spec, components=comps)

    # ---------------------------------------------------------------- stages

    def stage_of_round(self, rnd: int) -> int:
        return max(i for i, s in enumerate(self.stage_starts) if s <= rnd)

    def stage_ends(self) -> tuple[int, ...]:
        """The last round of each stage."""
        return tuple(s - 1 for s in self.stage_starts[1:]) + (self.rounds,)


def _restrict(
    profile: ClientProfile, tasks: tuple[str, ...], mods: tuple[str, ...]
) -> ClientProfile:
    return replace(profile, tasks=tasks, modalities=mods)


def _node_ids(federation: Federation) -> set[str]:
    ids: set[str] = set()
    for c in federation.clients:
        for i in range(2, len(c.path) + 1):
            ids.add("/".join(c.path[:i]))
    return ids
