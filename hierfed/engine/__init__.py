"""The round engine: a tree walk over tier nodes, with one Channel per edge and a round context.

Files, one concept each: ``context`` (the frozen RoundContext), ``channel`` (the only writer of
the ledger and the clock), ``stats`` (what a round did; what clients carry), ``sampling``
(who takes part), ``graph`` (the tree), ``checks`` (settings checked before work), ``walk``
(the level-synchronous round walk), ``leaves`` (clients train and report), ``peers`` (sibling
and device-to-device mixing). See docs/architecture.md.
"""

from __future__ import annotations

from hierfed.engine.channel import Channel, ChannelSet, EdgeTimes, Message
from hierfed.engine.context import RoundContext
from hierfed.engine.stats import ClientStore, RoundStats, require_no_failures

__all__ = [
    "Channel",
    "ChannelSet",
    "ClientStore",
    "EdgeTimes",
    "Message",
    "RoundContext",
    "RoundStats",
    "require_no_failures",
]
