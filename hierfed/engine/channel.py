"""Channel: the only code that moves anything across an edge, records it and clocks it.

One ``Channel`` per tier edge (child tier -> parent tier) and one per peer link kind
(``student<->student``). A topology hands it what crosses the edge, as the per-component wire
sizes the edge's postprocessors produced (the chain of the receiving tier runs on the workers,
where the tensors are); the channel

* writes the CommLedger (one record per transfer, component by component),
* charges the simulated clock (``hierfed.clock.Clock`` is the cost model; this module is its
  only caller) and keeps the round's arrival times in ``EdgeTimes``,
* applies the edge's deadline and straggler policy (the parent tier's ``deadline_s`` and
  ``straggler``).

Nothing else in hierfed writes the ledger or asks the clock for a time (a test keeps it so).
An edge feature is an option here, never a branch in the engine: codecs arrive as encoded
sizes (``hierfed.postprocess.codecs``, ``broadcast``), and under secure aggregation the
parent's merge hands back the protocol's messages (``secure_round``, ``hierfed.secagg``).

Example::

    >>> from hierfed.config import load_config
    >>> from hierfed.ledger import CommLedger
    >>> from hierfed.simulation import build_federation
    >>> cfg = load_config(None, ["data.num_institutions=2", "data.essay_only_institutions=0"])
    >>> fed = build_federation(cfg)
    >>> channels = ChannelSet(cfg, fed, CommLedger())
    >>> edge = channels.edge("student", "institution")
    >>> times, child = EdgeTimes(), fed.clients[0].id
    >>> edge.down(times, rnd=1, parent="global/inst-00", child=child, sizes={"head.t": 40}, key=())
    >>> edge.report(
    ...     times, rnd=1, child=child, parent="global/inst-00", busy_s=0.5, sizes={"head.t": 40}, key=()
    ... )
    True
    >>> channels.ledger.by_edge()
    {'institution->student': 40, 'student->institution': 40}
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hierfed.clock import Clock
from hierfed.config import RunConfig
from hierfed.data.federation import Federation
from hierfed.ledger import CommLedger


@dataclass
class EdgeTimes:
    """Simulated times of one round, per node: what the channels charged so far.

    ``down[c]``: how long the broadcast to ``c`` took; ``arrival[c]``: when ``c``'s report
    reached its parent, counted from that broadcast (``inf``: never); ``elapsed[n]``: how long
    node ``n``'s parent-round has lasted; ``late``: reports past the deadline, in order."""

    down: dict[str, float] = field(default_factory=dict)
    arrival: dict[str, float] = field(default_factory=dict)
    elapsed: dict[str, float] = field(default_factory=dict)
    late: list[str] = field(default_factory=list)  # reports past their parent's deadline

    def never(self, nodes: Iterable[str]) -> None:
        """Nodes that will not report this node-round (dropped out, failed)."""
        self.arrival.update(dict.fromkeys(nodes, math.inf))


@dataclass(frozen=True)
class Message:
    """One transfer between two nodes: what each component costs on the wire."""

    src: str
    dst: str
    sizes: Mapping[str, int]


class Channel:
    """One edge kind: ``child -> parent`` tiers (up and down) or ``tier <-> tier`` (peers)."""

    def __init__(
        self, *, child: str, parent: str, ledger: CommLedger, clock: Clock, cfg: RunConfig
    ) -> None:
        self.child, self.parent = child, parent
        self.peer = child == parent
        self.up_name = f"{child}<->{parent}" if self.peer else f"{child}->{parent}"
        self.down_name = f"{parent}->{child}"
        self.ledger, self.clock = ledger, clock
        tier = cfg.tier(parent)
        self.deadline_s = tier.deadline_s  # 0 = no deadline
        self.straggler = tier.straggler  # discard | drop
        # under secure aggregation the parent's merge reports what went on the wire (the
        # masked inputs and the protocol's messages: ``secure_round``), not ``report``
        self.secure = not self.peer and tier.secure_aggregation != "none"

    # ------------------------------------------------------------ parent <-> child

    def down(
        self,
        times: EdgeTimes,
        *,
        rnd: int,
        parent: str,
        child: str,
        sizes: Mapping[str, int],
        key: Sequence[object],
    ) -> None:
        """A broadcast from ``parent`` to ``child``: recorded, and its time kept for ``report``."""
        self.ledger.record(
            round=rnd, src=parent, dst=child, edge=self.down_name, direction="down", sizes=sizes
        )
        times.down[child] = self.clock.transfer_s(
            child, sum(sizes.values()), rnd=rnd, key=(*key, "down")
        )

    def report(
        self,
        times: EdgeTimes,
        *,
        rnd: int,
        child: str,
        busy_s: float,
        parent: str,
        sizes: Mapping[str, int] | None,
        key: Sequence[object],
    ) -> bool:
        """``child``'s report to its parent after ``busy_s`` of its own work (training, or its
        subtree's node-rounds). Returns whether it arrived by the parent's deadline.

        ``sizes``: the wire sizes of what it sends (``None`` or empty: nothing). A late child
        is never merged; under ``straggler: drop`` it is told to stop and sends nothing (no
        bytes recorded), under ``discard`` it still sends (bytes recorded, update unused)."""
        up = sum(sizes.values()) if sizes else 0
        t = (
            times.down.get(child, 0.0)
            + busy_s
            + self.clock.transfer_s(child, up, rnd=rnd, key=(*key, "up"))
        )
        times.arrival[child] = t
        in_time = not (self.deadline_s > 0 and t > self.deadline_s)
        if not in_time:
            times.late.append(child)
        if sizes and (in_time or self.straggler == "discard") and not self.secure:
            self.ledger.record(
                round=rnd,
                src=child,
                dst=parent,
                edge=self.up_name,
                direction="up",
                sizes=sizes,
            )
        return in_time

    def waited(self, times: EdgeTimes, children: Iterable[str]) -> float:
        """How long a parent waits for ``children`` (all it sampled this node-round): until the
        last on-time report, or until the deadline when one of them dropped out or was late."""
        arrivals = [times.arrival.get(c, math.inf) for c in children]
        dl = self.deadline_s
        on_time = [t for t in arrivals if t < math.inf and (dl <= 0 or t <= dl)]
        waited = max(on_time, default=0.0)
        if dl > 0 and len(on_time) < len(arrivals):
            waited = dl
        return waited

    def protocol(
        self, *, rnd: int, src: str, dst: str, direction: str, sizes: Mapping[str, int]
    ) -> None:
        """Protocol messages a real transport already carried and timed (a deployed SecAgg+
        round's stages; ``direction``: up or down): recorded, not charged to the clock."""
        self.ledger.record(
            round=rnd,
            src=src,
            dst=dst,
            edge=self.up_name if direction == "up" else self.down_name,
            direction=direction,
            sizes=sizes,
        )

    def secure_round(self, rnd: int, node: str, report: Any, key: Sequence[object]) -> float:
        """A secure-aggregation node-round's messages (``hierfed.secagg.edge.SecAggReport``):
        every one recorded (up: member -> node, down: node -> member), and the simulated
        seconds its extra message rounds add (per stage, the slowest member's download and
        upload; the masked inputs' upload was clocked by ``report``)."""
        slowest: dict[tuple[str, str], float] = defaultdict(float)
        for stage, src, dst, sizes in report.messages:
            up = dst == node
            member = src if up else dst
            self.ledger.record(
                round=rnd,
                src=src,
                dst=dst,
                edge=self.up_name if up else self.down_name,
                direction="up" if up else "down",
                sizes=dict(sizes),
            )
            if stage != "masked":
                t = self.clock.transfer_s(
                    member,
                    sum(n for _, n in sizes),
                    rnd=rnd,
                    key=(*key, "secagg", stage, "up" if up else "down"),
                )
                slowest[stage, "up" if up else "down"] = max(
                    slowest[stage, "up" if up else "down"], t
                )
        return sum(slowest.values())

    # ------------------------------------------------------------ peers

    def exchange(
        self, messages: Sequence[Message], *, rnd: int, key: Sequence[object], repeat: int = 1
    ) -> float:
        """One mixing step among peers: every message recorded (``repeat`` times in a row, for
        steps that send the same values), and the step's simulated seconds returned: until the
        slowest sender has pushed everything it sends its neighbours through its own link (so a
        denser graph costs time, not only bytes)."""
        out: dict[str, int] = defaultdict(int)
        for m in messages:
            for _ in range(repeat):
                self.ledger.record(
                    round=rnd,
                    src=m.src,
                    dst=m.dst,
                    edge=self.up_name,
                    direction="peer",
                    sizes=m.sizes,
                )
            out[m.src] += sum(m.sizes.values())
        return max(
            (
                self.clock.transfer_s(src, nbytes, rnd=rnd, key=key)
                for src, nbytes in sorted(out.items())
            ),
            default=0.0,
        )


class ChannelSet:
    """Every channel of a run, made on first use; owns the ledger and the clock's cost model."""

    def __init__(self, cfg: RunConfig, federation: Federation, ledger: CommLedger) -> None:
        self.cfg, self.ledger = cfg, ledger
        self.clock = Clock(cfg, federation)
        self._edges: dict[tuple[str, str], Channel] = {}

    def edge(self, child: str, parent: str) -> Channel:
        """The channel between tiers ``child`` and ``parent`` (``child == parent``: peers)."""
        key = (child, parent)
        if key not in self._edges:
            self._edges[key] = Channel(
                child=child, parent=parent, ledger=self.ledger, clock=self.clock, cfg=self.cfg
            )
        return self._edges[key]

    def peers(self, tier: str) -> Channel:
        return self.edge(tier, tier)

    def training_s(self, client_id: str, *, rnd: int, key: Sequence[object]) -> float:
        """Simulated seconds of a client's local training in this (round, key)."""
        return self.clock.compute_s(client_id, rnd=rnd, key=key)
