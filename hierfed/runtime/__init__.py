"""Runtimes: ``ray`` (worker actors, default) and ``local`` (in-process, for debugging)."""

from hierfed.runtime.base import Runtime, make_runtime, split_even
from hierfed.runtime.worker import WorkerCore, WorkerSetup

__all__ = ["Runtime", "WorkerCore", "WorkerSetup", "make_runtime", "split_even"]
