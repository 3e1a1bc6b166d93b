"""The in-process runtime: the same WorkerCore code, called directly (for debugging).

With ``num_workers > 1`` it still slices the cohort exactly like the Ray runtime, running the
slices one after another on one core, which is how tests show that slicing changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hierfed.runtime.jobs as msg  # the messages between driver and workers
from hierfed.config import RuntimeConfig
from hierfed.model.spec import ModelSpec
from hierfed.runtime.base import Runtime, split_even
from hierfed.runtime.worker import WorkerCore, WorkerSetup
from hierfed.update import State, Update


class LocalRuntime(Runtime):
    name = "local"

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self._workers = max(1, cfg.num_workers or 1)
        self.core: WorkerCore | None = None

    def start(self, setup: WorkerSetup) -> None:
        self.core = WorkerCore(setup)
        # a "kill-worker" fault would end this very process: it only means something on Ray
        self.core.faults.kill_at.clear()
        self.core.faults.crash_at.clear()

    @property
    def num_workers(self) -> int:
        return self._workers

    def put(self, obj: Any) -> Any:
        return obj

    def _core(self) -> WorkerCore:
        if self.core is None:
            raise RuntimeError("LocalRuntime.start() was not called")
        return self.core

    def model_info(self) -> tuple[ModelSpec, State]:
        return self._core().model_info()

    def train(self, jobs: Sequence[msg.TrainJob], states: Any) -> tuple[list[msg.ClientMeta], Any]:
        metas: list[msg.ClientMeta] = []
        updates: dict[str, Update] = {}
        for part in split_even(jobs, self._workers):
            m, u = self._core().train(part, states)
            metas += m
            updates.update(u)
        return metas, updates

    def merge(
        self, tasks: Sequence[msg.MergeTask], sources: Sequence[Any]
    ) -> list[msg.MergeResult]:
        out: list[msg.MergeResult] = []
        for part in split_even(tasks, self._workers):
            out += self._core().merge(part, *sources)
        return out

    def evaluate(
        self, jobs: Sequence[msg.EvalJob], states: Mapping[str, State]
    ) -> list[tuple[str, dict[str, tuple[float, int]]]]:
        out = []
        for part in split_even(jobs, self._workers):
            out += self._core().evaluate(part, states)
        return out

    def mix(
        self,
        tasks: Sequence[msg.MixTask],
        starts: Any,
        expectations: Mapping[str, Any],
        sources: Sequence[Any],
    ) -> list[msg.MixResult]:
        out: list[msg.MixResult] = []
        for part in split_even(tasks, self._workers):
            out += self._core().mix(part, starts, expectations, *sources)
        return out

    def average(self, task: msg.AverageTask, states: Any) -> tuple[float, State]:
        return self._core().average(task, states)
