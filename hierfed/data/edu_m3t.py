"""``edu-m3t``: a multi-modal multi-task composite of ``chem97``, ``courses`` and ``digits``.

**The pairing across datasets is synthetic glue.** Every record of each modality is real,
but a client's tabular row, course title and digit scan never belonged to one person or
one school: each Chem97 student row is *paired* with a course title and a handwritten
digit drawn (keyed by the seed) from pools of the two other data sets. The tasks are
therefore independent of each other across modalities; the composite exists to exercise
multi-modal, multi-task federated fine-tuning on real records with a real hierarchy, not
to model any real relation between A-level results, course catalogues and handwriting.

Federation: the real Chem97 hierarchy ``global -> lea -> school`` (schools are clients,
split by flwr-datasets' ``NaturalIdPartitioner``). Each kept LEA gets a label-skewed pool
of courses (Dirichlet over subject) and of digits (Dirichlet over the digit), both from
flwr-datasets' ``DirichletPartitioner`` with alpha ``data.label_skew``; each pool is split
into train and test halves (``data.test_fraction``), and a school's rows draw their title
and scan from its LEA's pools (with replacement: pools are smaller than the schools).

* modalities: ``tabular`` (Chem97 features, see ``chem97``), ``text`` (course title, raw
  string, tokenized by the backbone), ``image`` (8x8 digit scan);
* tasks: ``alevel_grade`` (tabular, 6 classes), ``subject`` (text, ``options.subjects``
  classes), ``is_<flag>`` per ``options.flags`` (text, 2 classes), ``digit`` (image, 10);
* a school lacks the image modality (and the ``digit`` task) with probability
  ``data.missing_modality``, keyed by its id;
* ``data.options``: ``leas`` (default 6: the first 6 LEAs, or a list of LEA ids),
  ``schools_per_lea`` (default 5), ``subjects`` (8), ``flags`` ([special_topic]),
  ``resource_mix`` ({}: all ``full``).

The global test set pairs the kept schools' test rows with every modality, capped at
``data.global_test_size`` rows (keyed sample).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.chem97 import TABULAR, client_id, kept_schools, student_arrays
from hierfed.data.chem97 import TASKS as CHEM_TASKS
from hierfed.data.chem97 import load_table as chem97_table
from hierfed.data.courses import TEXT, course_table
from hierfed.data.digits import IMAGE, digit_table
from hierfed.data.digits import TASK as DIGIT_TASK
from hierfed.data.federation import ClientData, ClientProfile, Federation, TaskSpec, subset
from hierfed.data.partition import (
    assign_resources,
    cap_rows,
    check_options,
    concat,
    dirichlet_partitions,
    split_rows,
    take,
)
from hierfed.registry import DATASETS
from hierfed.seeding import np_rng

OPTIONS: dict[str, Any] = {
    "leas": 6,
    "schools_per_lea": 5,
    "subjects": 8,
    "flags": ["special_topic"],
    "resource_mix": {},
}
MODALITIES = {"tabular": TABULAR, "text": TEXT, "image": IMAGE}


def _pools(
    table: ClientData, label: str, leas: list[int], cfg: DataConfig, seed: int, name: str
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per LEA: (train rows, test rows) of a Dirichlet label-skewed share of ``table``."""
    parts = dirichlet_partitions(
        table.labels[label], len(leas), cfg.label_skew, seed, "edu-m3t", name, min_size=4
    )
    out = {}
    for lea, rows in zip(leas, parts):
        tr, te = split_rows(len(rows), cfg.test_fraction, np_rng(seed, "edu-m3t", name, lea))
        out[lea] = (rows[tr], rows[te])
    return out


@DATASETS.register("edu-m3t")
def build_edu_m3t(cfg: DataConfig, seed: int) -> Federation:
    """Schools with tabular + text + image rows and four kinds of task (pairing is synthetic)."""
    opts = check_options(cfg.options, OPTIONS, "edu-m3t")
    df = chem97_table()
    students = student_arrays(df)
    schools, lea_of = kept_schools(df, opts)
    courses, course_tasks, subjects = course_table(
        {"subjects": opts["subjects"], "flags": opts["flags"]}
    )
    digits = digit_table()
    leas = sorted(set(lea_of[s] for s in schools))
    cpool = _pools(courses, "subject", leas, cfg, seed, "courses")
    dpool = _pools(digits, "digit", leas, cfg, seed, "digits")
    tasks: dict[str, TaskSpec] = {
        "alevel_grade": CHEM_TASKS["alevel_grade"],
        **course_tasks,
        "digit": DIGIT_TASK,
    }

    def paired(rows: np.ndarray, lea: int, half: int, rng: np.random.Generator) -> ClientData:
        chem = take(students, rows)
        n = len(rows)
        crow = (
            rng.choice(cpool[lea][half], size=n, replace=True) if n else np.zeros(0, dtype=np.int64)
        )
        drow = (
            rng.choice(dpool[lea][half], size=n, replace=True) if n else np.zeros(0, dtype=np.int64)
        )
        c, d = take(courses, crow), take(digits, drow)
        return ClientData(
            {
                "tabular": chem.inputs["tabular"],
                "text": c.inputs["text"],
                "image": d.inputs["image"],
            },
            {"alevel_grade": chem.labels["alevel_grade"], **c.labels, "digit": d.labels["digit"]},
        )

    clients: list[ClientProfile] = []
    train: dict[str, ClientData] = {}
    test: dict[str, ClientData] = {}
    full_tests: list[ClientData] = []
    for school, rows in schools.items():
        lea = lea_of[school]
        cid = client_id(lea, school)
        rng = np_rng(seed, "edu-m3t", cid)
        tr, te = split_rows(len(rows), cfg.test_fraction, rng)
        full_tr, full_te = (
            paired(rows[tr], lea, 0, rng),
            paired(rows[te], lea, 1, rng),
        )
        mods: tuple[str, ...]
        if rng.random() < cfg.missing_modality:
            mods = ("tabular", "text")
        else:
            mods = ("image", "tabular", "text")
        ctasks = tuple(sorted(t for t, spec in tasks.items() if set(spec.modalities) <= set(mods)))
        train[cid] = subset(full_tr, np.arange(len(tr)), ctasks, mods)
        test[cid] = subset(full_te, np.arange(len(te)), ctasks, mods)
        if len(te):
            full_tests.append(full_te)
        clients.append(ClientProfile(cid, mods, ctasks, num_train=len(tr), num_test=len(te)))
    clients = assign_resources(clients, opts["resource_mix"], seed)
    return Federation(
        name="edu-m3t",
        tier_names=("global", "lea", "school"),
        modalities=dict(MODALITIES),
        tasks=tasks,
        clients=clients,
        train=train,
        test=test,
        global_test=cap_rows(
            concat(full_tests), cfg.global_test_size, seed, "edu-m3t", "global-test"
        ),
        description="real Chem97 schools/LEAs, each student row paired (synthetic glue) with a real "
        "UCLA course title and a real scikit-learn digit scan",
        extra={"subjects": subjects, "synthetic_pairing": True},
    )
