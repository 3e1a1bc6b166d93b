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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from hierfed.errors import ConfigError
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


class Aggregator(ABC):
    """Merges the updates a tier node received into one pre-weighted Update."""

    associative: ClassVar[bool] = False
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.check_options(dict(options))
        self.options = {**self.option_defaults, **dict(options)}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        """Reject unknown option names at config time; subclasses also check values."""
        unknown = set(options) - set(cls.option_defaults)
        if unknown:
            raise ConfigError(
                f"{key}.{sorted(unknown)[0]}",
                options[sorted(unknown)[0]],
                f"{cls.__name__} takes options {sorted(cls.option_defaults) or 'none'}",
            )

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
