"""Postprocessors: what a sender does to its update on a tier edge, in configured order.

Clipping, DP noise and compression codecs are all postprocessors. ``process`` returns the
update the receiver will see (a codec returns the decoded values); ``wire_nbytes`` says how
many bytes each component costs on the link after this step (the ledger records the last).

Example::

    >>> import torch
    >>> from hierfed.update import State, Update
    >>> from hierfed.postprocess.clip import Clip
    >>> u = Update.from_delta({"head.t": {"w": torch.tensor([3.0, 4.0])}}, 2.0, sender="s", round=0)
    >>> ctx = PostContext("s", "global", "global", 0, 0)
    >>> out, sizes = apply_chain([Clip({"max_norm": 1.0})], u, ctx)
    >>> round(float(out.mean()["head.t"]["w"].norm()), 4), sizes
    (1.0, {'head.t': 8})
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hierfed.options import WithOptions
from hierfed.update import State, Update


@dataclass(frozen=True)
class PostContext:
    sender: str
    receiver: str
    tier: str  # the receiving tier
    round: int
    seed: int
    # the sender's LoRA rank when it is below the adapters' stored rank (a lower-rank client:
    # only its first ``rank`` slots are on the wire, ``hierfed.postprocess.wire``); None = all
    rank: int | None = None


class Postprocessor(WithOptions, ABC):
    """One step a sender applies on a tier edge; options as in ``hierfed.options``."""

    @abstractmethod
    def process(self, update: Update, ctx: PostContext) -> Update:
        """The update as the receiver will see it; ``update`` is not mutated."""

    def wire_nbytes(self, update: Update, sizes: dict[str, int]) -> dict[str, int]:
        """Bytes per component on the wire after this step (default: unchanged)."""
        return sizes

    def receive(self, update: Update, ctx: PostContext) -> Update:
        """What the *receiving* node does to one validated incoming update before merging
        (default: nothing). Unlike ``process`` it does not rely on the sender's honesty."""
        return update

    #: True for a step that keeps state on the sender across rounds (top-k's error-feedback
    #: residual): its ``deliver`` runs where that state is at hand (see ``deliver``)
    stateful: bool = False

    def deliver(
        self, update: Update, ctx: PostContext, memory: State | None
    ) -> tuple[Update, State | None]:
        """A stateful step's sender-side work with the sender's ``memory`` from its last
        send (None: first send): the update as delivered and the sender's new memory.

        The driver keeps every sender's memory (``ClientStore.codec``, checkpointed) and
        hands it to the worker that merges the sender's update, which calls this right after
        validation: in simulation that equals running it last in the sender's chain (a
        config check keeps a stateful step last). ``process`` of such a step leaves the
        values alone and ``wire_nbytes`` gives its encoded sizes (they depend on shapes only)."""
        return update, memory


def apply_chain(
    chain: Sequence[Postprocessor], update: Update, ctx: PostContext
) -> tuple[Update, dict[str, int]]:
    """Run the sender's chain; returns the update as the receiver sees it and its bytes per
    component on the wire: raw float bytes of what is sent (only the first ``ctx.rank``
    LoRA slots of a lower-rank sender), then as each step encodes it."""
    from hierfed.postprocess.wire import Codec, payload_nbytes

    sizes = payload_nbytes(update, ctx.rank)
    for pp in chain:
        update = pp.process(update, ctx)
        if isinstance(pp, Codec):
            sizes = pp.encoded_nbytes(update, ctx.rank)
        else:
            sizes = pp.wire_nbytes(update, sizes)
    return update, sizes


def apply_deliver(
    chain: Sequence[Postprocessor], update: Update, ctx: PostContext, memory: State | None
) -> tuple[Update, State | None]:
    """Run the chain's stateful steps (``Postprocessor.deliver``) on one sender's update."""
    for pp in chain:
        if pp.stateful:
            update, memory = pp.deliver(update, ctx, memory)
    return update, memory


def apply_receive(chain: Sequence[Postprocessor], update: Update, ctx: PostContext) -> Update:
    """Run every step's receiver-side hook, in chain order, on one incoming update."""
    for pp in chain:
        update = pp.receive(update, ctx)
    return update


def build_chain(
    names: Sequence[str], options: Mapping[str, Mapping[str, Any]]
) -> list[Postprocessor]:
    from hierfed.registry import POSTPROCESSORS

    return [POSTPROCESSORS.get(n)(dict(options.get(n, {}))) for n in names]
