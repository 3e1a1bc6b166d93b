"""Peak memory of a whole process tree (the process and all descendants, e.g. Ray workers).

A background thread samples every ``interval`` seconds and keeps the peak of the summed RSS.
RSS counts shared pages (the Ray object store's shared memory, shared libraries) once per
process, so the sum is an upper bound of the tree's real footprint.
"""

from __future__ import annotations

import threading

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(summed RSS in bytes, number of processes) of ``root`` and its descendants now."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total, count = 0, 0
    for p in procs:
        try:
            total += p.memory_info().rss
            count += 1
        except psutil.Error:
            continue
    return total, count


class PeakTreeMemory:
    """``with PeakTreeMemory(pid) as m: ...`` then ``m.peak_bytes`` and ``m.peak_procs``."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_bytes = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            total, count = tree_rss(self.root)
            self.peak_bytes = max(self.peak_bytes, total)
            self.peak_procs = max(self.peak_procs, count)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakTreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30
