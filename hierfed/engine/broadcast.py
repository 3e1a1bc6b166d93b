"""A parent's broadcast to its sampled members, through the down channel.

Each sampled member gets its parent's state, as the parent tier's ``broadcast_codec`` encodes
and decodes it, and only the components it uses from above (a leaf's local components are
never sent: it starts them from the skeleton). Returns what the members receive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hierfed.engine.context import RoundContext
from hierfed.postprocess.broadcast import encode_state, state_nbytes_as
from hierfed.update import State

if TYPE_CHECKING:
    from hierfed.engine.walk import TreeEngine


def broadcast(
    eng: TreeEngine, sampled: dict[str, list[str]], cur: dict[str, State], ctx: RoundContext
) -> dict[str, State]:
    """``sampled``: node -> members; ``cur``: each node's state. Records every transfer and
    returns node -> the state its members start from (decoded by the broadcast codec)."""
    sent: dict[str, State] = {}
    child_level = eng.nodes[next(iter(sampled))].level + 1
    for n, members in sampled.items():
        codec = eng.cfg.tier(eng.nodes[n].tier).broadcast_codec
        sent[n] = encode_state(codec, cur[n], ctx, n)
        for c in members:
            comps = [
                x
                for x in (eng.holds[c] if c in eng.leaves else cur[n])
                if eng.level_of(x) < child_level
            ]
            channel = ctx.channels.edge(eng.nodes[c].tier, eng.nodes[n].tier)
            channel.down(
                ctx.times,
                rnd=ctx.round,
                parent=n,
                child=c,
                sizes={x: state_nbytes_as(codec, cur[n][x]) for x in comps},
                key=ctx.key,
            )
    return sent
