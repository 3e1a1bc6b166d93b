"""CommLedger: one record per transfer, summaries per tier edge, link and component.

Every byte that crosses a link is recorded where the topology moves it: broadcasts down
(parent -> child) and updates up (child -> parent), after encoding. The frozen backbone is
never transferred, so it never appears here.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Transfer:
    round: int
    src: str
    dst: str
    edge: str  # directed tier edge: "student->institution" (up), "institution->student" (down)
    direction: str  # "up", "down", or "peer" (gossip between neighbours: edge "student<->student")
    component: str
    nbytes: int


class CommLedger:
    """Append-only list of Transfers with summaries."""

    def __init__(self, records: Iterable[Transfer] = ()) -> None:
        self.records: list[Transfer] = list(records)

    def record(
        self, *, round: int, src: str, dst: str, edge: str, direction: str, sizes: Mapping[str, int]
    ) -> None:
        """Record one transfer of several components (``sizes``: component -> bytes)."""
        if direction not in ("up", "down", "peer"):  # peer: a gossip exchange between neighbours
            raise ValueError(f"direction must be 'up', 'down' or 'peer', got {direction!r}")
        for comp in sorted(sizes):
            self.records.append(Transfer(round, src, dst, edge, direction, comp, int(sizes[comp])))

    def total(self) -> int:
        return sum(r.nbytes for r in self.records)

    def _by(self, key, rnd: int | None = None) -> dict:
        out: dict = defaultdict(int)
        for r in self.records:
            if rnd is None or r.round == rnd:
                out[key(r)] += r.nbytes
        return dict(sorted(out.items()))

    def by_edge(self, round: int | None = None) -> dict[str, int]:
        """Bytes per directed tier edge, e.g. ``{"student->institution": 1234, "institution->student": 99}``."""
        return self._by(lambda r: r.edge, round)

    def by_component(self, round: int | None = None) -> dict[str, int]:
        return self._by(lambda r: r.component, round)

    def by_link(self, round: int | None = None) -> dict[str, int]:
        return self._by(lambda r: f"{r.src}->{r.dst}", round)

    def save(self, path: str | Path) -> None:
        """Write the records as CSV (one row per transfer and component)."""
        path = Path(path)
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(Transfer.__dataclass_fields__))
            w.writeheader()
            for r in self.records:
                w.writerow(asdict(r))

    @classmethod
    def load(cls, path: str | Path) -> CommLedger:
        with Path(path).open() as fh:
            rows = list(csv.DictReader(fh))
        return cls(
            Transfer(
                int(r["round"]),
                r["src"],
                r["dst"],
                r["edge"],
                r["direction"],
                r["component"],
                int(r["nbytes"]),
            )
            for r in rows
        )

    def summary_json(self) -> str:
        return json.dumps(
            {"total": self.total(), "by_edge": self.by_edge(), "by_component": self.by_component()}
        )
