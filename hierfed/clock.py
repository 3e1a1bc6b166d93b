"""A simulated wall clock: how long a round would take on real, heterogeneous devices.

The cost model (``clock`` section of the config) is deliberately simple:

* every client has a compute speed in training rows per second; a local round processes
  ``num_train * local_epochs * len(tasks)`` rows (the ClientTrainer's schedule);
* every node below the root has a link to its parent with a bandwidth and a latency; moving
  ``b`` bytes over it takes ``latency + b / bandwidth`` (both directions alike);
* speeds, bandwidths and latencies are lognormal around the configured medians, with one
  factor per *group* (the node's institution — its ancestor at the ``institution`` tier, or
  just below the root if there is none: some institutions have slow labs and slow networks) and one per node; each round adds a small
  per-round jitter. Every draw is keyed by ``(seed, "clock", ...)``, so times are a pure
  function of the seed;
* opt-in, resource classes: ``clock.resource_speed`` and ``clock.resource_bandwidth`` scale
  a client's speed and its link's bandwidth by its class (e.g. ``{light: 0.25}``: light
  devices train and upload 4x slower); empty (the default) treats every class alike.

Nothing here sleeps or measures real time; the channels (hierfed/engine/channel.py, the
only callers) ask it how long transfers and training would take, and apply deadlines. Uncompressed or
compressed, the bytes charged are the ones the ledger records.

Example::

    >>> from hierfed.config import load_config
    >>> from hierfed.simulation import build_federation
    >>> cfg = load_config(None, ["data.num_institutions=2", "data.essay_only_institutions=0"])
    >>> clock = Clock(cfg, build_federation(cfg))
    >>> cid = clock.fed_ids[0]
    >>> clock.compute_s(cid, rnd=1, key=()) > 0 and clock.transfer_s(cid, 1000, rnd=1, key=()) > 0
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from hierfed.config import RunConfig
from hierfed.data.federation import Federation
from hierfed.seeding import np_rng


class Clock:
    """Per-node compute and link costs drawn from ``cfg.clock``; pure functions of the seed."""

    def __init__(self, cfg: RunConfig, federation: Federation) -> None:
        self.c = cfg.clock
        self.seed = cfg.seed
        self.epochs = cfg.train.local_epochs
        profiles = federation.by_id
        self.fed_ids = [c.id for c in federation.clients]
        self.rows = {cid: p.num_train * len(p.tasks) for cid, p in profiles.items()}
        self.resource = {cid: p.resource for cid, p in profiles.items()}
        names = federation.tier_names
        self.group_level = names.index("institution") if "institution" in names[1:-1] else 1
        self._speed: dict[str, float] = {}
        self._link: dict[str, tuple[float, float]] = {}

    def group_of(self, node_id: str) -> str:
        """The node's institution ("global/inst-01" for a student of inst-01); nodes above that
        tier (e.g. a region) are their own group."""
        return "/".join(node_id.split("/")[: self.group_level + 1])

    def _lognormal(self, median: float, sigma: float, *key: object) -> float:
        if sigma <= 0:
            return median
        return median * math.exp(sigma * float(np_rng(self.seed, "clock", *key).standard_normal()))

    def speed(self, client_id: str) -> float:
        """Training rows per second of a client (fixed for the run)."""
        if client_id not in self._speed:
            g = self._lognormal(1.0, self.c.group_sigma, "group-compute", self.group_of(client_id))
            self._speed[client_id] = (
                g
                * self._lognormal(self.c.rows_per_s, self.c.compute_sigma, "compute", client_id)
                * self._class_factor(self.c.resource_speed, client_id)
            )
        return self._speed[client_id]

    def link(self, node_id: str) -> tuple[float, float]:
        """(bandwidth in bytes per second, latency in seconds) of the node's link to its parent."""
        if node_id not in self._link:
            g = self._lognormal(1.0, self.c.group_sigma, "group-network", self.group_of(node_id))
            bw = (
                g
                * self._lognormal(
                    self.c.bandwidth_mbps, self.c.bandwidth_sigma, "bandwidth", node_id
                )
                * 1e6
                / 8
            )
            bw *= self._class_factor(self.c.resource_bandwidth, node_id)
            lat = self._lognormal(self.c.latency_s, self.c.latency_sigma, "latency", node_id)
            self._link[node_id] = (bw, lat)
        return self._link[node_id]

    def _class_factor(self, factors: Mapping[str, float], node_id: str) -> float:
        """The node's resource-class factor (1 for tier nodes and unlisted classes); the
        factor multiplies after the draws, so an empty table leaves every time as it was."""
        if not factors or node_id not in self.resource:
            return 1.0
        return float(factors.get(self.resource[node_id], 1.0))

    def _jitter(self, node_id: str, rnd: int, key: Sequence[object], what: str) -> float:
        return self._lognormal(1.0, self.c.round_jitter, what, rnd, *key, node_id)

    def compute_s(self, client_id: str, *, rnd: int, key: Sequence[object]) -> float:
        """Seconds a client needs for its local training in this (round, key)."""
        rows = self.rows[client_id] * self.epochs
        return rows / self.speed(client_id) * self._jitter(client_id, rnd, key, "compute-jitter")

    def transfer_s(self, node_id: str, nbytes: int, *, rnd: int, key: Sequence[object]) -> float:
        """Seconds to move ``nbytes`` over the node's link to its parent (either direction)."""
        if nbytes <= 0:
            return 0.0
        bw, lat = self.link(node_id)
        return (lat + nbytes / bw) * self._jitter(node_id, rnd, key, "link-jitter")
