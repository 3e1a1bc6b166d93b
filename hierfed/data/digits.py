"""``digits``: scikit-learn's handwritten digits as the image modality (offline).

Data: ``sklearn.datasets.load_digits`` (1,797 8x8 grey-level scans of handwritten digits,
UCI; shipped inside scikit-learn): modality ``image`` of shape (1, 8, 8) scaled to [0, 1];
task ``digit`` (10 classes).

Federation: tiers ``global -> institution -> student``: ``data.num_institutions x
data.students_per_institution`` clients, label-skewed with flwr-datasets'
``DirichletPartitioner`` (alpha ``data.label_skew``); per-client test rows
(``data.test_fraction``); the global test set is a keyed sample of
``data.global_test_size`` of them. ``options.resource_mix`` assigns resource classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.federation import ClientData, Federation, ModalitySpec, TaskSpec
from hierfed.data.partition import GRID_TIERS, check_options, skewed_grid, split_federation
from hierfed.errors import DataError
from hierfed.registry import DATASETS

OPTIONS: dict[str, Any] = {"resource_mix": {}}
IMAGE = ModalitySpec("image", "image", (1, 8, 8))
TASK = TaskSpec("digit", ("image",), 10, description="read a handwritten digit (8x8 scan)")


def digit_table() -> ClientData:
    """Every scan as a (1, 8, 8) float32 image in [0, 1] with its digit label."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset needs scikit-learn: pip install 'hierfed[data]'") from None
    d = load_digits()
    images = (np.asarray(d.images, dtype=np.float32) / 16.0)[:, None]
    return ClientData({"image": images}, {"digit": np.asarray(d.target, dtype=np.int64)})


@DATASETS.register("digits")
def build_digits(cfg: DataConfig, seed: int) -> Federation:
    """Label-skewed digit clients; same ``(cfg, seed)`` gives the same federation."""
    opts = check_options(cfg.options, OPTIONS, "digits")
    table = digit_table()
    return split_federation(
        name="digits",
        table=table,
        rows=skewed_grid(table, "digit", cfg, seed, "digits"),
        cfg=cfg,
        seed=seed,
        tier_names=GRID_TIERS,
        modalities={"image": IMAGE},
        tasks={"digit": TASK},
        resource_mix=opts["resource_mix"],
        description="scikit-learn handwritten digits (8x8): label-skewed clients",
    )
