"""``train_cohort``: ``WorkerCore.train`` for a slice of clients, batched where it can be.

Each client is prepared and finished exactly as one at a time (``WorkerCore.prepare`` /
``finish``: poisoned data, lower-rank views and masks, delta, postprocess chain); only the
fit in between runs batched, for the stackable groups of ``cohort_groups``. A client with a
DP-SGD plan, and a group of one, train one at a time. Failures stay per client: a client that
raises while being prepared or finished is reported in its own ``ClientMeta.error``, and a
group whose batched fit raises is trained again one client at a time, so the clients that
fail are the ones reported.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import hierfed.runtime.jobs as msg
from hierfed.batched.trainer import CohortItem, CohortTrainer, cohort_groups
from hierfed.update import State, Update

if TYPE_CHECKING:
    from hierfed.runtime.worker import Prepared, WorkerCore

log = logging.getLogger(__name__)

Result = tuple[msg.ClientMeta, Update | None]


def _one(core: WorkerCore, job: msg.TrainJob, prep: Prepared) -> Result:
    """``job``'s client alone, with the one-at-a-time trainer (DP-SGD included)."""
    try:
        return core.fit_prepared(job, prep)
    except Exception as exc:
        return core.failed(job, exc), None


def train_cohort(
    core: WorkerCore, jobs: Sequence[msg.TrainJob], states: Mapping[str, State]
) -> tuple[list[msg.ClientMeta], dict[str, Update]]:
    """Metas (in job order) and updates by client id, as ``WorkerCore.train`` returns them."""
    results: list[Result | None] = [None] * len(jobs)
    preps: dict[int, Prepared] = {}
    items: list[tuple[int, CohortItem]] = []
    for i, job in enumerate(jobs):
        try:
            if core.faults:
                core.faults.in_client(job.client_id)
            prep = core.prepare(job, states[job.parent_id])
        except Exception as exc:
            results[i] = (core.failed(job, exc), None)
            continue
        if prep.plan is not None:  # DP-SGD trains one at a time
            results[i] = _one(core, job, prep)
            continue
        preps[i] = prep
        items.append((i, CohortItem(prep.data, prep.tasks, prep.begin, tuple(job.trains), job.key)))
    cohort = CohortTrainer(core.trainer)
    for group in cohort_groups([it for _, it in items], core.cfg.train.batched_max_clients):
        idx = [items[g][0] for g in group]
        if len(idx) == 1:
            results[idx[0]] = _one(core, jobs[idx[0]], preps[idx[0]])
            continue
        try:
            fits = cohort.fit_group([items[g][1] for g in group])
        except Exception as exc:  # the failing clients are found one at a time
            log.warning("batched fit of %d clients failed (%s); one at a time", len(idx), exc)
            for i in idx:
                results[i] = _one(core, jobs[i], preps[i])
            continue
        for i, fit in zip(idx, fits):
            try:
                results[i] = core.finish(jobs[i], preps[i], fit, None)
            except Exception as exc:
                results[i] = (core.failed(jobs[i], exc), None)
    metas: list[msg.ClientMeta] = []
    updates: dict[str, Update] = {}
    for job, res in zip(jobs, results):
        assert res is not None
        metas.append(res[0])
        if res[1] is not None:
            updates[job.client_id] = res[1]
    return metas, updates
