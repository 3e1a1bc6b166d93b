"""A watchdog that ends the local Ray session's processes when the driver dies abruptly.

``ray.init`` ties the processes it starts itself (GCS, raylet, ...) to the driver, but not
the agents the raylet starts: measured with Ray 2.55.1, after the driver of a tiny run is
SIGKILLed, ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` stay alive (the runtime env
agent even logs that the raylet is dead and that it exits, and does not), and ignore
SIGTERM. A SIGKILLed driver runs no clean-up, so the clean-up must live elsewhere: this
small process, started by the driver right after it started Ray, notes the driver's
descendants every ``interval`` seconds; once the driver is gone it gives Ray ``grace``
seconds to stop on its own, then SIGKILLs those of the noted processes that are still
alive (checked by pid *and* start time, so a reused pid is never hit). It only ever touches
processes descended from its own driver, never another Ray session on the machine.

Run as ``python -P .../hierfed/runtime/reaper.py DRIVER_PID``; ``start_reaper`` does that. It
is run by path, not as ``-m hierfed.runtime.reaper``: that would import the ``hierfed.runtime``
package (torch, the worker) for nothing, measured 1.1 s of CPU taken from the workers starting
at the same time on a 2-core machine. ``-P`` keeps this folder (``ray.py``) off ``sys.path``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def start_reaper(*, interval: float = 1.0, grace: float = 3.0) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process (the driver); it exits by itself after the driver."""
    return subprocess.Popen(
        [
            sys.executable,
            "-P",  # this file's folder holds ray.py: not on sys.path (needs only stdlib, psutil)
            os.path.abspath(__file__),
            str(os.getpid()),
            str(interval),
            str(grace),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the driver's terminal is not meant for it
        close_fds=True,
    )


def _alive(pid: int, created: float) -> bool:
    import psutil

    try:
        p = psutil.Process(pid)
        return p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(driver: int, *, interval: float, grace: float) -> list[int]:
    """Block until ``driver`` is gone; then kill its remembered descendants. Returns their pids."""
    import psutil

    me = os.getpid()
    try:
        proc = psutil.Process(driver)
        born = proc.create_time()
    except psutil.Error:
        return []
    seen: dict[int, float] = {}
    while _alive(driver, born):
        try:
            for child in proc.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child.create_time())
        except psutil.Error:
            pass
        time.sleep(interval)
    time.sleep(grace)
    killed = []
    for pid, created in sorted(seen.items()):
        if _alive(pid, created):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


if __name__ == "__main__":  # pragma: no cover - exercised by tests/test_ray_hardening.py
    watch(int(sys.argv[1]), interval=float(sys.argv[2]), grace=float(sys.argv[3]))
