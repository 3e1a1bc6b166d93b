"""``example-blobs``: a tiny synthetic tabular federation (a dataset plug-in).

A dataset is ``build(cfg: DataConfig, seed) -> Federation``. Here: ``num_institutions``
institutions of ``students_per_institution`` students, each with Gaussian blobs of 4
features labelled by which of 3 centres they came from; each institution favours one class.
Every draw is keyed by the seed (hierfed.seeding), so the data is reproducible.
"""

from __future__ import annotations

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.federation import ClientData, ClientProfile, Federation, ModalitySpec, TaskSpec
from hierfed.seeding import np_rng

CENTRES = np.array(
    [[2.0, 0.0, 0.0, 1.0], [-2.0, 1.0, 0.0, 0.0], [0.0, -2.0, 1.5, 0.0]], dtype=np.float32
)


def _rows(n: int, rng: np.random.Generator, prior: np.ndarray) -> ClientData:
    y = rng.choice(3, size=n, p=prior)
    x = (CENTRES[y] + rng.normal(0, 0.8, (n, 4))).astype(np.float32)
    return ClientData({"features": x}, {"blob": y.astype(np.int64)})


def build_blobs(cfg: DataConfig, seed: int) -> Federation:
    clients, train, test = [], {}, {}
    for i in range(cfg.num_institutions):
        prior = np.full(3, 0.2)
        prior[i % 3] = 0.6
        for s in range(cfg.students_per_institution):
            cid = f"global/inst-{i:02d}/student-{s:03d}"
            rng = np_rng(seed, "example-blobs", cid)
            n = max(8, cfg.samples_per_student)
            n_test = max(1, int(n * cfg.test_fraction))
            train[cid] = _rows(n - n_test, rng, prior)
            test[cid] = _rows(n_test, rng, prior)
            clients.append(
                ClientProfile(cid, ("features",), ("blob",), num_train=n - n_test, num_test=n_test)
            )
    return Federation(
        name="example-blobs",
        tier_names=("global", "institution", "student"),
        modalities={"features": ModalitySpec("features", "tabular", (4,))},
        tasks={
            "blob": TaskSpec("blob", ("features",), 3, description="which centre a point came from")
        },
        clients=clients,
        train=train,
        test=test,
        global_test=_rows(
            cfg.global_test_size, np_rng(seed, "example-blobs", "global-test"), np.full(3, 1 / 3)
        ),
        description="example plug-in dataset: Gaussian blobs (synthetic)",
    )
