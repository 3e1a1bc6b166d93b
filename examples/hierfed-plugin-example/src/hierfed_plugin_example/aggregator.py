"""``example_damped_mean``: the weighted mean, shrunk towards "no change" by ``damping``.

Returns a pre-weighted Update like every aggregator: tensors are ``(1 - damping) * sum``
with the weights unchanged, so the parent's single division gives the damped mean.
Not associative (damping twice is not damping once), so declared so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hierfed.aggregators.base import AggContext, Aggregator
from hierfed.errors import ConfigError
from hierfed.update import Update


class DampedMean(Aggregator):
    associative = False
    option_defaults = {"damping": 0.5}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        super().check_options(options, key)
        d = options.get("damping", cls.option_defaults["damping"])
        if not isinstance(d, (int, float)) or not (0 <= d < 1):
            raise ConfigError(
                f"{key}.damping", d, "a fraction in [0, 1): 0 = the plain weighted mean"
            )

    def aggregate(
        self, updates: Sequence[Update], state: Any, ctx: AggContext
    ) -> tuple[Update | None, Any]:
        total = Update.sum(updates)
        if total is None:
            return None, state
        keep = 1.0 - float(self.options["damping"])
        tensors = {
            c: {p: t * keep for p, t in params.items()} for c, params in total.tensors.items()
        }
        return Update(tensors, dict(total.weights), total.meta), state
