"""Imports the built-in plug-in modules so their ``register`` decorators run.

Third-party plug-ins register through entry points instead (see README, "Plug-ins").
"""

from __future__ import annotations

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
