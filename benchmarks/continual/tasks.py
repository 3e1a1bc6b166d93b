"""``digits-tasks``: scikit-learn's digits with three course-like tasks on the same scans.

A workload plug-in (``plugins: [benchmarks.continual.tasks]``): the ``digits`` federation
(label-skewed clients, hierfed/data/digits.py) whose rows carry two more labels derived from
the digit — ``parity`` (odd or even) and ``high`` (5..9 or 0..4) — besides ``digit`` itself.
Each task has its own head and prompt; the image encoder and the backbone adapters are
shared, which is where learning a new task can overwrite an old one.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.digits import build_digits
from hierfed.data.federation import ClientData, Federation, TaskSpec
from hierfed.registry import DATASETS

TASKS = {
    "digit": TaskSpec("digit", ("image",), 10, description="read a handwritten digit"),
    "parity": TaskSpec("parity", ("image",), 2, description="is the digit odd?"),
    "high": TaskSpec("high", ("image",), 2, description="is the digit 5 or more?"),
}


def _with_tasks(data: ClientData) -> ClientData:
    d = data.labels["digit"]
    labels = {"digit": d, "parity": (d % 2).astype(np.int64), "high": (d >= 5).astype(np.int64)}
    return ClientData(data.inputs, labels, data.groups)


@DATASETS.register("digits-tasks")
def build_digits_tasks(cfg: DataConfig, seed: int) -> Federation:
    """The digits federation with tasks digit, parity and high on every client."""
    fed = build_digits(cfg, seed)
    return Federation(
        name="digits-tasks",
        tier_names=fed.tier_names,
        modalities=fed.modalities,
        tasks=dict(TASKS),
        clients=[replace(c, tasks=tuple(TASKS)) for c in fed.clients],
        train={k: _with_tasks(v) for k, v in fed.train.items()},
        test={k: _with_tasks(v) for k, v in fed.test.items()},
        global_test=_with_tasks(fed.global_test),
        description="scikit-learn digits with digit, parity and high tasks",
    )
