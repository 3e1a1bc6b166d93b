"""Aggregator contract: ``aggregate(updates, state, ctx) -> (update, state)``.

Explicit state in and out; inputs are never mutated. The returned Update is pre-weighted
like its inputs (``tensors[c] = estimate[c] * weights[c]``), so a parent tier can keep
summing. An aggregator declares whether it is ``associative``: only then may partial sums
be formed below it (e.g. per worker) without changing the result.

Example::

    >>> import torch
    >>> from hierfed.update import Update
    >>> from hierfed.aggregators import AggContext, WeightedMean
    >>> us = [Update.from_delta({"head.t": {"w": torch.tensor([x])}}, w, sender=s, round=0)
    ...       for s, x, w in [("a", 1.0, 1.0), ("b", 4.0, 2.0)]]
    >>> merged, _ = WeightedMean({}).aggregate(us, None, AggContext("global", "global", 0, 0))
    >>> merged.mean()["head.t"]["w"].item()
    3.0
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from hierfed.options import WithOptions
from hierfed.update import State, Update


@dataclass(frozen=True)
class AggContext:
    """What an aggregator may know about where it runs; frozen, passed to every call."""

    node_id: str
    tier: str
    round: int
    seed: int
    # the node's current component values: what its children started this round from, so
    # ``state[c] + update.tensors[c] / update.weights[c]`` is a child's absolute value
    # (product-space rules such as ``lora_exact`` need it); None when not known
    state: State | None = None


class Aggregator(WithOptions, ABC):
    """Merges the updates a tier node received into one pre-weighted Update.

    Options: ``option_defaults`` and ``check_options`` (unknown names refused at config time)."""

    associative: ClassVar[bool] = False

    def init_state(self) -> Any:
        """State before the first round (None for stateless rules)."""
        return None

    @abstractmethod
    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        """Merge ``updates`` (possibly empty: then return None) given ``state``."""

    def min_updates(self) -> int:
        """Fewest updates the rule needs to be meaningful (robust rules need more)."""
        return 1
