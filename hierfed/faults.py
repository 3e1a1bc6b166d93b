"""Fault injection for tests and drills (``runtime.faults``); inert unless configured.

* ``raise:<client id>`` — the client's training raises (an exception in client code);
* ``sleep:<client id>:<seconds>`` — the client hangs that long (a stuck client);
* ``kill-worker:<round>:<client id>`` — the worker process about to train that client in that
  round exits at once (a dead actor). Fires on the first attempt only, so a retried slice runs.
* ``crash-worker:<round>:<client id>`` — the same on every attempt: a client that brings down
  any process that trains it (e.g. a native crash); a retry cannot save the round.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any


class InjectedFault(RuntimeError):
    """Raised in client code by a ``raise:`` fault."""


class Faults:
    def __init__(self, specs: Sequence[str]) -> None:
        self.raise_for: set[str] = set()
        self.sleep_for: dict[str, float] = {}
        self.kill_at: set[tuple[int, str]] = set()
        self.crash_at: set[tuple[int, str]] = set()
        for spec in specs:
            kind, _, rest = spec.partition(":")
            if kind == "raise":
                self.raise_for.add(rest)
            elif kind == "sleep":
                cid, _, secs = rest.rpartition(":")
                self.sleep_for[cid] = float(secs)
            elif kind in ("kill-worker", "crash-worker"):
                rnd, _, cid = rest.partition(":")
                (self.kill_at if kind == "kill-worker" else self.crash_at).add((int(rnd), cid))

    def __bool__(self) -> bool:
        return bool(self.raise_for or self.sleep_for or self.kill_at or self.crash_at)

    def before_slice(self, rnd: int, client_ids: Sequence[str], attempt: int) -> None:
        """Called by a worker before a training slice; may end the process."""
        if attempt == 0 and any((rnd, c) in self.kill_at for c in client_ids):
            os._exit(17)
        if any((rnd, c) in self.crash_at for c in client_ids):
            os._exit(17)

    def in_client(self, client_id: str) -> None:
        """Called inside a client's training."""
        if client_id in self.sleep_for:
            time.sleep(self.sleep_for[client_id])
        if client_id in self.raise_for:
            raise InjectedFault(f"injected fault in client {client_id}")


def check_faults_config(cfg: Any) -> None:
    """``runtime.faults``: every entry one of the four forms above (raises ConfigError)."""
    from hierfed.errors import ConfigError

    faults = cfg.runtime.faults
    usage = (
        "use raise:<client>, sleep:<client>:<seconds>, kill-worker:<round>:<client> or "
        "crash-worker:<round>:<client>"
    )
    if not isinstance(faults, list):
        raise ConfigError("runtime.faults", faults, f"must be a list; {usage}")
    for f in faults:
        parts = f.split(":") if isinstance(f, str) else []
        kind = parts[0] if parts else ""
        ok = False
        if kind == "raise" and len(parts) == 2:
            ok = bool(parts[1])
        elif kind == "sleep" and len(parts) == 3:
            try:
                secs = float(parts[2])
            except ValueError:
                secs = math.nan
            ok = bool(parts[1]) and math.isfinite(secs) and secs >= 0
        elif kind in ("kill-worker", "crash-worker") and len(parts) == 3:
            ok = parts[1].isdigit() and int(parts[1]) >= 1 and bool(parts[2])
        if not ok:
            raise ConfigError("runtime.faults", f, usage)
