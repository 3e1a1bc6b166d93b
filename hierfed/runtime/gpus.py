"""GPU shares of Ray workers: what ``runtime.gpus_per_worker`` may say, and whether a cluster
can hold the pool it asks for.

A worker actor asks Ray for ``gpus_per_worker`` GPUs (a fraction shares one GPU between
workers; above one, whole GPUs). An actor lives on one node, so the question is not the
cluster's total but how many workers fit on each node. Asked of a cluster that cannot hold
them, Ray would leave the actors pending forever; the runtime asks these functions first
and fails at once with an error that names the GPUs (``hierfed/runtime/ray.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hierfed.config_schema import RunConfig
from hierfed.errors import ConfigError

# Ray keeps resource quantities to four decimals and refuses a finer fraction
_RAY_GRANULARITY = 1e-4


def check_gpu_config(cfg: RunConfig) -> None:
    """The share itself, before Ray starts: a fraction of one GPU, or a whole number of GPUs.

    >>> from hierfed.config import load_config
    >>> check_gpu_config(load_config(None, ["runtime.gpus_per_worker=0.25"]))
    >>> check_gpu_config(load_config(None, ["runtime.gpus_per_worker=1.5"]))
    Traceback (most recent call last):
    ...
    hierfed.errors.ConfigError: config key 'runtime.gpus_per_worker' = 1.5: ...
    """
    g = cfg.runtime.gpus_per_worker
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g >= 0:
        return  # the range check in config_checks names these
    if g > 1 and g != int(g):
        raise ConfigError(
            "runtime.gpus_per_worker",
            g,
            "above one GPU a worker gets whole GPUs: give a whole number (2), "
            "or a fraction up to 1 to share a GPU between workers (0.5)",
        )
    if g < 1 and abs(g / _RAY_GRANULARITY - round(g / _RAY_GRANULARITY)) > 1e-6:
        raise ConfigError(
            "runtime.gpus_per_worker",
            g,
            "Ray keeps GPU shares to four decimals: round it (e.g. 0.3333)",
        )


def workers_per_node(gpus_per_worker: float, node_gpus: float) -> int:
    """How many workers of ``gpus_per_worker`` GPUs each one node of ``node_gpus`` GPUs holds.

    >>> workers_per_node(0.1, 1.0), workers_per_node(0.5, 3.0), workers_per_node(2.0, 3.0)
    (10, 6, 1)
    """
    # 1 // 0.1 is 9.0 in floating point: divide, then floor with a tolerance below Ray's 1e-4
    return math.floor(node_gpus / gpus_per_worker + 1e-6)


def plan_gpu_workers(
    gpus_per_worker: float, *, num_workers: int, cpu_workers: int, node_gpus: Sequence[float]
) -> int:
    """The number of workers to start when each asks ``gpus_per_worker`` GPUs, or a
    ConfigError naming the GPUs when the cluster cannot hold them.

    ``num_workers`` is ``runtime.num_workers`` (0 = one per CPU: ``cpu_workers``, then capped at
    what the GPUs hold); ``node_gpus`` is each live node's GPU total. Without a GPU share the
    answer is the CPU's, whatever the nodes hold.

    >>> plan_gpu_workers(0.5, num_workers=0, cpu_workers=16, node_gpus=[1.0, 2.0])
    6
    >>> plan_gpu_workers(1.0, num_workers=0, cpu_workers=2, node_gpus=[0.0])
    Traceback (most recent call last):
    ...
    hierfed.errors.ConfigError: config key 'runtime.gpus_per_worker' = 1.0: ... has no GPU ...
    """
    wanted = num_workers or cpu_workers
    if gpus_per_worker <= 0:
        return wanted
    total = sum(node_gpus)
    if total <= 0:
        raise ConfigError(
            "runtime.gpus_per_worker",
            gpus_per_worker,
            "asks each worker for GPUs, but this Ray cluster has no GPU "
            "(ray.cluster_resources() GPU = 0): set runtime.gpus_per_worker=0 to train on the "
            "CPU, or connect to a cluster with GPUs (runtime.address=<head>:<port>)",
        )
    biggest = max(node_gpus)
    if gpus_per_worker > biggest:
        raise ConfigError(
            "runtime.gpus_per_worker",
            gpus_per_worker,
            f"more GPUs per worker than any node has: a worker runs on one node, and the "
            f"largest has {biggest:g} GPU (the cluster {total:g}, on nodes with "
            f"{_gpu_list(node_gpus)}): ask for at most {biggest:g}",
        )
    fits = sum(workers_per_node(gpus_per_worker, g) for g in node_gpus)
    if num_workers == 0:
        return min(cpu_workers, fits)
    if num_workers > fits:
        raise ConfigError(
            "runtime.num_workers",
            num_workers,
            f"{num_workers} workers with runtime.gpus_per_worker={gpus_per_worker:g} need "
            f"{num_workers * gpus_per_worker:g} GPUs, but the cluster's nodes "
            f"({_gpu_list(node_gpus)} GPU) hold {fits} such workers: set "
            f"runtime.num_workers<={fits} (or 0 for as many as fit), or a smaller "
            "runtime.gpus_per_worker",
        )
    return num_workers


def _gpu_list(node_gpus: Sequence[float]) -> str:
    return ", ".join(f"{g:g}" for g in sorted(node_gpus, reverse=True))
