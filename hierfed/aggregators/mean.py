"""Component-aware weighted mean (FedAvg's rule)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.registry import AGGREGATORS
from hierfed.update import Update


@AGGREGATORS.register("weighted_mean")
class WeightedMean(Aggregator):
    """Sum of pre-weighted updates; each component is merged only among the updates that
    carry it, so its weight counts only its holders. Associative."""

    associative = True

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        return Update.sum(updates), state
