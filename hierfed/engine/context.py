"""RoundContext: everything one round of a topology works with, in one frozen record.

Handed by the run loop (``hierfed.simulation``) to ``Topology.run_round`` and by the topology
to its helpers, instead of values threaded by hand: the round, the key of the current
node-round (tier local-round indices, so every draw below it is keyed), the runtime, the
channels (the only writers of the ledger and the clock), the round's simulated times, the
statistics sink and the per-client store (DP accountants and local components).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hierfed.engine.channel import ChannelSet, EdgeTimes
from hierfed.engine.stats import ClientStore, RoundStats
from hierfed.runtime.base import Runtime


@dataclass(frozen=True)
class RoundContext:
    round: int
    runtime: Runtime
    channels: ChannelSet
    clients: ClientStore
    stats: RoundStats = field(default_factory=RoundStats)
    times: EdgeTimes = field(default_factory=EdgeTimes)
    key: tuple = ()

    @property
    def seed(self) -> int:
        return self.channels.cfg.seed

    def at(self, *key: object) -> RoundContext:
        """The same round, one node-round deeper (``key`` extended)."""
        return replace(self, key=(*self.key, *key))
