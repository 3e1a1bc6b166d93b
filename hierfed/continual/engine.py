"""The continual schedule inside the round walk (``TreeEngine``), one call per round.

``enter_round(r)`` sets, from the schedule alone (so a resume replays it; calling it twice for
one round changes nothing): which clients take
part (the others are dropped right after the draw, exactly as ``exclude`` drops them, so
everyone else's draws stay the same); which components each client holds and trains; the
scopes (``old_scope``); and
which components exist: every node state grows a component from its seed-initialised value
the round it first exists, and never carries or sends one before. A node that joins late
takes the current state of its parent when first drawn, as every member does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hierfed.continual.fit import ContinualFit
from hierfed.continual.schedule import Schedule, continual_on
from hierfed.unlearning.exclusion import excluded_members

if TYPE_CHECKING:
    from hierfed.engine.walk import TreeEngine


class ContinualEngine:
    def __init__(self, eng: TreeEngine) -> None:
        self.eng = eng
        self.schedule = Schedule(eng.cfg, eng.fed)
        self.base = frozenset(c for c in eng.excluded if c in eng.leaves)  # ``exclude``
        self.spec = eng.spec  # the tree's own scopes; ``old_scope`` narrows them by round

    def enter_round(self, rnd: int) -> None:
        eng, sch = self.eng, self.schedule
        spec = eng.spec = sch.spec_at(self.spec, rnd)
        eng.holds = {c: sch.holds(spec, c, rnd) for c in eng.leaves}
        frozen = sch.frozen(rnd)
        eng.trains = {c: tuple(x for x in h if x not in frozen) for c, h in eng.holds.items()}
        absent = frozenset(c for c in eng.leaves if not sch.trains(c, rnd))
        eng.excluded = excluded_members(self.base | absent, eng.below)
        alive = sch.components(spec, rnd)
        for nid, st in eng.states.items():
            if set(st) != alive:  # components exist from their first round on (never vanish)
                eng.states[nid] = {c: st.get(c, eng.initial[c]) for c in eng.initial if c in alive}
        cfg = eng.cfg.continual
        if cfg.ewc > 0 and rnd not in eng.anchors and self._closes(rnd):
            root = eng.states[eng.root]
            eng.anchors[rnd] = {c: root[c] for c in root if spec.scope_level(c) == 0}

    def _closes(self, rnd: int) -> bool:
        """Whether some client's task window closes at ``rnd`` (its last round was rnd - 1)."""
        return any(self.schedule.last_close(c, rnd) == rnd for c in self.eng.leaves)

    def fit(self, cid: str, rnd: int) -> ContinualFit:
        """What client ``cid`` trains on in ``rnd`` and with which mitigations."""
        sch, cfg = self.schedule, self.eng.cfg.continual
        old = sch.old_tasks(cid, rnd)
        anchor = None
        if cfg.ewc > 0 and old:
            snap = self.eng.anchors.get(sch.last_close(cid, rnd))
            if snap is not None:
                trains = set(self.eng.trains[cid])
                anchor = {c: v for c, v in snap.items() if c in trains}
        return ContinualFit(
            cid,
            tasks=sch.tasks_at(cid, rnd),
            old=old if (cfg.replay or cfg.ewc > 0) else (),
            memory=int(cfg.memory),
            replay=bool(cfg.replay),
            ewc=float(cfg.ewc),
            anchor=anchor,
        )


def continual_engine(eng: TreeEngine) -> ContinualEngine | None:
    """The engine's continual part, or None when the config schedules nothing."""
    return ContinualEngine(eng) if continual_on(eng.cfg) else None
