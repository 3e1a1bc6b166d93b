"""Runtime: executes what a topology asks — training slices, tier merges, evaluation.

A topology talks only to this interface (no ``ray.*`` calls in topologies). Work is split
into contiguous slices of the sorted job list, one per worker, and results are returned
in job order — so results never depend on the number of workers or on completion order.

Example (the in-process runtime; ``ray`` is used the same way)::

    rt = make_runtime(cfg.runtime)
    rt.start(WorkerSetup(cfg, federation))
    metas, updates = rt.train(jobs, states)
    rt.shutdown()
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from hierfed.config import RuntimeConfig
from hierfed.model.spec import ModelSpec
from hierfed.runtime.jobs import (
    AverageTask,
    ClientMeta,
    EvalJob,
    MergeResult,
    MergeTask,
    MixResult,
    MixTask,
    TrainJob,
)
from hierfed.update import State

T = TypeVar("T")


def split_even(items: Sequence[T], parts: int) -> list[list[T]]:
    """Contiguous, near-equal slices (empty ones dropped)."""
    n = len(items)
    parts = max(1, min(parts, n))
    out, start = [], 0
    for i in range(parts):
        size = n // parts + (1 if i < n % parts else 0)
        out.append(list(items[start : start + size]))
        start += size
    return [s for s in out if s]


class Runtime(ABC):
    """Interface every runtime implements. ``Handle`` values are opaque to callers."""

    name: str = "abstract"

    @abstractmethod
    def start(self, setup: Any) -> None:
        """Create the workers (each builds one model skeleton)."""

    @property
    @abstractmethod
    def num_workers(self) -> int: ...

    @abstractmethod
    def put(self, obj: Any) -> Any:
        """Share ``obj`` with all workers once (the object store for Ray); returns a handle."""

    @abstractmethod
    def model_info(self) -> tuple[ModelSpec, State]:
        """The model's spec and initial state (every component), as worker 0 built them.

        The driver takes both from here instead of building a skeleton of its own: a
        pretrained backbone and peft are then loaded only where training happens."""

    @abstractmethod
    def train(self, jobs: Sequence[TrainJob], states: Any) -> tuple[list[ClientMeta], Any]:
        """Train ``jobs`` (sorted by client id) from ``states`` (a handle of parent id -> State).

        Returns the metas in job order and a handle to the updates (client id -> Update).
        """

    @abstractmethod
    def merge(self, tasks: Sequence[MergeTask], sources: Sequence[Any]) -> list[MergeResult]:
        """Run tier-node merges on workers; ``sources`` are update handles or plain dicts."""

    @abstractmethod
    def evaluate(
        self, jobs: Sequence[EvalJob], states: Mapping[str, State]
    ) -> list[tuple[str, dict[str, tuple[float, int]]]]:
        """Evaluate jobs; results in job order."""

    def mix(
        self,
        tasks: Sequence[MixTask],
        starts: Any,
        expectations: Mapping[str, Any],
        sources: Sequence[Any],
    ) -> list[MixResult]:
        """Gossip-mix nodes on workers (``WorkerCore.mix``); ``starts`` is a handle of node -> State,
        ``sources`` update handles as returned by ``train``. Results in task order."""
        raise NotImplementedError(f"the {self.name} runtime does not support gossip mixing")

    def average(self, task: AverageTask, states: Any) -> tuple[float, State]:
        """Consensus distance and weighted mean of node states (a handle), on one worker."""
        raise NotImplementedError(f"the {self.name} runtime does not support gossip averaging")

    def drain_events(self) -> list[str]:
        """Failures the runtime recovered from since the last call (dead workers, retries)."""
        return []

    def shutdown(self) -> None:  # noqa: B027  (optional hook: runtimes without workers keep it)
        """Release workers (a shared Ray session is left running)."""


def make_runtime(cfg: RuntimeConfig) -> Runtime:
    if cfg.name == "local":
        from hierfed.runtime.local import LocalRuntime

        return LocalRuntime(cfg)
    from hierfed.runtime.ray import RayRuntime

    return RayRuntime(cfg)
