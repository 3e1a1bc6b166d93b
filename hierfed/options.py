"""WithOptions: the shared shape of plug-ins that take named options from the config.

Aggregators, postprocessors and attacks declare ``option_defaults``; an unknown option name
is refused at config time (``check_options``, which subclasses extend to check values),
naming the key and the options the plug-in does take.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

from hierfed.errors import ConfigError


def finite_nonneg(v: object) -> bool:
    """A real number (not a bool), finite and >= 0: what most numeric options must be."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


class WithOptions:
    option_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.check_options(dict(options))
        self.options = {**self.option_defaults, **dict(options)}

    @classmethod
    def check_options(cls, options: dict[str, Any], key: str = "options") -> None:
        """Reject unknown option names; subclasses also check values."""
        unknown = set(options) - set(cls.option_defaults)
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(
                f"{key}.{name}",
                options[name],
                f"{cls.__name__} takes options {sorted(cls.option_defaults) or 'none'}",
            )
