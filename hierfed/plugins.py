"""Imports the built-in plug-in modules so their ``register`` decorators run.

Third-party plug-ins register through entry points instead (see README, "Plug-ins"). A
workload that is not a library plug-in (the benchmarks' ``mlp-bench`` data and ``mlp``
backbone) registers when its module is imported; a run names such modules in its config's
``plugins`` list and ``import_modules`` imports them in the driver and in every worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

import hierfed.aggregators  # noqa: F401
import hierfed.aggregators.lora  # noqa: F401
import hierfed.data.chem97  # noqa: F401
import hierfed.data.courses  # noqa: F401
import hierfed.data.digits  # noqa: F401
import hierfed.data.edu_m3t  # noqa: F401
import hierfed.data.edu_synth  # noqa: F401
import hierfed.model.backbone  # noqa: F401
import hierfed.model.hf_backbone  # noqa: F401
import hierfed.postprocess  # noqa: F401
import hierfed.privacy  # noqa: F401  (the gaussian postprocessor)


def import_modules(names: Sequence[str]) -> None:
    """Import each module named in the config's ``plugins`` (registering what it defines)."""
    from hierfed.errors import ConfigError

    for name in names:
        try:
            importlib.import_module(str(name))
        except ImportError as exc:
            raise ConfigError(
                "plugins",
                name,
                f"cannot import it ({exc}); give importable module paths, e.g. "
                "[benchmarks.mlp_bench], and run from where they can be imported",
            ) from None
