"""The Ray runtime: a fixed pool of worker actors, each a thin shell around a WorkerCore.

* ``ray.init`` locally (``runtime.num_cpus``), bound to 127.0.0.1, or connects to
  ``runtime.address``; a Ray session that is already up (e.g. a test suite's, or one a
  notebook started to share between runs) is reused and left running; a session the runtime
  started itself ends with it (``shutdown``). A local session gets a watchdog (``hierfed.runtime.reaper``) that ends the
  processes Ray would leave behind if the driver is killed.
* One actor per worker (``runtime.num_workers``, default one per CPU), never one per client.
  Each builds one model skeleton and frozen backbone, then trains slice after slice.
* The round's states go into the object store once (``put``); jobs reference them.
* ``runtime.gpus_per_worker`` is checked against the cluster's nodes before any actor starts
  (``hierfed.runtime.gpus``): a cluster without GPUs, or without a node big enough for one
  worker's share, is refused at once. Where the workers landed is logged (INFO) and kept in
  ``placement``. Running on a cluster: docs/cluster.md.
* Failures come back as ``NodeFailure`` naming the worker and the cause, not a Ray trace.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import hierfed.runtime.jobs as msg  # the messages between driver and workers
from hierfed.config import RuntimeConfig
from hierfed.errors import ConfigError, DataError, NodeFailure
from hierfed.model.spec import ModelSpec
from hierfed.runtime.base import Runtime, split_even
from hierfed.runtime.gpus import plan_gpu_workers
from hierfed.runtime.reaper import start_reaper
from hierfed.runtime.worker import WorkerCore, WorkerSetup
from hierfed.update import State

log = logging.getLogger(__name__)


class _WorkerDied(Exception):
    """A worker actor died while holding a slice (internal to the Ray runtime)."""


class _WorkerShell:
    """Ray actor body: builds the WorkerCore and forwards calls to it."""

    def __init__(self, setup: WorkerSetup) -> None:
        # an error building the skeleton (e.g. a ConfigError for model.lora_targets) is kept
        # and raised by ready(), so the driver gets it as such rather than as a dead actor
        self.error: BaseException | None = None
        try:
            self.core = WorkerCore(setup)
        except Exception as exc:
            self.error = exc

    def ready(self) -> tuple[int, str, str]:
        """The worker's pid, its Ray node id and the device it trains on."""
        import ray

        if self.error is not None:
            raise self.error
        return os.getpid(), ray.get_runtime_context().get_node_id(), str(self.core.device)

    def model_info(self) -> tuple[ModelSpec, State]:
        return self.core.model_info()

    def train(self, jobs, states, attempt=0):
        return self.core.train(jobs, states, attempt)

    def merge(self, tasks, *sources):
        return self.core.merge(tasks, *sources)

    def evaluate(self, jobs, states):
        return self.core.evaluate(jobs, states)

    def mix(self, tasks, starts, expectations, *sources):
        return self.core.mix(tasks, starts, expectations, *sources)

    def average(self, task, states):
        return self.core.average(task, states)


# Ray's switch for single-machine sessions (read when ray is imported, by every process Ray
# starts): with it off, the node address is 127.0.0.1 and GCS, raylet, object manager and
# agents listen on the loopback interface only. Ray 2.55 maps an explicit
# ``_node_ip_address="127.0.0.1"`` back to the host's address, so that does not do it.
_SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> None:
    """Make a Ray session this process starts listen on 127.0.0.1 only (not for
    ``runtime.address``: a cluster must be reachable). Measured with Ray 2.55.1: without it
    a local session listens on the host's address and on every IPv6 interface, with token
    authentication off; with it, every listening socket is 127.0.0.1."""
    import sys

    os.environ.setdefault(_SINGLE_HOST_ENV, "0")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ[_SINGLE_HOST_ENV] == "0":  # ray imported already
        constants.ENABLE_RAY_CLUSTER = False  # type: ignore[attr-defined]


def _node_gpus(ray: Any) -> list[float]:
    """Each live node's GPU total (0 for a node without)."""
    return [float(nd["Resources"].get("GPU", 0)) for nd in ray.nodes() if nd.get("Alive")]


def _log_placement(info: Sequence[tuple[int, str, str]], gpus: float) -> None:
    """One INFO line: how many workers landed on each node; a warning for a worker that was
    given a GPU share but sees no CUDA (it trains on the CPU: select_device)."""
    nodes: dict[str, int] = {}
    for _, node, _ in info:
        nodes[node] = nodes.get(node, 0) + 1
    log.info(
        "worker pool: %d workers on %d nodes (%s)",
        len(info),
        len(nodes),
        ", ".join(f"node {nid}: {k}" for nid, k in nodes.items()),
    )
    on_cpu = [i for i, (_, _, dev) in enumerate(info) if dev == "cpu"]
    if gpus > 0 and on_cpu:
        log.warning(
            "runtime.gpus_per_worker=%g: workers %s were given a GPU share but torch sees no "
            "CUDA there (a CPU-only torch build?); they train on the CPU",
            gpus,
            on_cpu,
        )


class RayRuntime(Runtime):
    name = "ray"

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self._reaper: Any = None
        self.actors: list[Any] = []
        self._round = -1
        self._events: list[str] = []
        self.placement: list[str] = []  # the Ray node id of each worker, as started
        # update object (ref hex) -> (round, the clients it holds), from train's chunks: a
        # merging worker is sent the objects that hold its nodes' senders, not every one
        self._holds: dict[str, tuple[int, frozenset[str]]] = {}

    def start(self, setup: WorkerSetup) -> None:
        if not self.cfg.address:
            _loopback_only()
        import ray

        # Ray's notice about a future change to GPU visibility says nothing about this run
        warnings.filterwarnings(
            "ignore", message="Tip: In future versions of Ray", category=FutureWarning
        )
        if not ray.is_initialized():
            # Ray starts its worker processes at nice 15; on a machine shared with other work that
            # leaves the actors a sliver of the CPU (measured: 2x slower per client than the driver
            # at load ~5). Run them at normal priority unless the user set otherwise.
            os.environ.setdefault("RAY_worker_niceness", "0")
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            if self.cfg.address:
                ray.init(address=self.cfg.address, **kwargs)
            else:
                if self.cfg.num_cpus:
                    kwargs["num_cpus"] = self.cfg.num_cpus
                ray.init(**kwargs)
                self._reaper = start_reaper()  # ends the agents Ray leaves after a SIGKILL
        free = ray.available_resources()
        cpus = int(free.get("CPU", 1)) or 1
        gpus = self.cfg.gpus_per_worker or 0
        # asked of a cluster that cannot hold them, GPU workers would wait for round_timeout_s:
        # refuse at once, naming the GPUs (hierfed/runtime/gpus.py)
        n = plan_gpu_workers(
            gpus,
            num_workers=self.cfg.num_workers,
            cpu_workers=max(1, cpus),
            node_gpus=_node_gpus(ray) if gpus > 0 else (),
        )
        per_cpu = min(1, cpus / n) if n > cpus else 1
        remote = ray.remote(num_cpus=per_cpu, num_gpus=gpus)(_WorkerShell)
        self._remote, self._setup_ref = remote, ray.put(setup)
        self.actors = [remote.remote(self._setup_ref) for _ in range(n)]
        ask = f"{n} workers of {per_cpu:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
        have = ", ".join(f"{k} {free.get(k, 0):g}" for k in ("CPU", "GPU"))
        info = self._get(
            [a.ready.remote() for a in self.actors], f"worker start ({ask}; free: {have})"
        )
        self.placement = [node for _, node, _ in info]
        _log_placement(info, gpus)

    def _replace(self, i: int) -> None:
        """Restore the pool: a fresh actor (new skeleton) in place of a dead one."""
        import ray

        try:
            ray.kill(self.actors[i])
        except Exception:  # already gone
            pass
        self.actors[i] = self._remote.remote(self._setup_ref)
        _, self.placement[i], _ = self._get(self.actors[i].ready.remote(), "worker restart")

    def drain_events(self) -> list[str]:
        out, self._events = self._events, []
        return out

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    def _get(self, refs: Any, what: str, *, allow_death: bool = False) -> Any:
        """ray.get bounded by runtime.round_timeout_s; errors become NodeFailure (or _WorkerDied)."""
        import ray

        try:
            return ray.get(refs, timeout=self.cfg.round_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise NodeFailure(
                "runtime",
                self._round,
                f"{what} exceeded runtime.round_timeout_s={self.cfg.round_timeout_s}",
            ) from None
        except ray.exceptions.RayActorError as exc:
            if allow_death:
                raise _WorkerDied(
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                ) from None
            raise NodeFailure(
                "worker", self._round, f"{what}: a worker actor died ({exc.__class__.__name__})"
            ) from None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, (ConfigError, DataError)):  # the user's input: say so as is
                raise cause from None
            raise NodeFailure(
                "worker", self._round, f"{what}: {type(cause).__name__}: {cause}"
            ) from None

    def put(self, obj: Any) -> Any:
        import ray

        return ray.put(obj)

    def model_info(self) -> tuple[ModelSpec, State]:
        return self._get(self.actors[0].model_info.remote(), "model spec and initial state")

    def train(self, jobs: Sequence[msg.TrainJob], states: Any) -> tuple[list[msg.ClientMeta], Any]:
        """Contiguous chunks of the sorted jobs (``runtime.chunks_per_worker`` per worker), handed
        out as workers free up: a worker that is slowed down (a busy machine, heavier clients)
        takes fewer chunks. One chunk in flight per worker, so a dead worker costs one chunk.
        Results come back in job order whatever finished first."""
        if jobs:
            self._round = jobs[0].round
        import ray

        # a late update may be merged a round after it was trained; older holdings are dropped
        # (an object whose holdings are unknown goes to every merging worker)
        self._holds = {h: v for h, v in self._holds.items() if v[0] >= self._round - 1}
        chunks = split_even(jobs, len(self.actors) * self.cfg.chunks_per_worker)  # validated >= 1
        metas: list[list[msg.ClientMeta]] = [[] for _ in chunks]
        update_refs: list[Any] = [None] * len(chunks)
        # meta ref -> (chunk, worker, update ref, attempt)
        pending: dict[Any, tuple[int, int, Any, int]] = {}
        queue = iter(range(len(chunks)))

        def submit(worker: int, chunk: int, attempt: int = 0) -> None:
            meta_ref, update_ref = (
                self.actors[worker]
                .train.options(num_returns=2)
                .remote(chunks[chunk], states, attempt)
            )
            pending[meta_ref] = (chunk, worker, update_ref, attempt)

        for worker in range(len(self.actors)):
            nxt = next(queue, None)
            if nxt is not None:
                submit(worker, nxt)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.round_timeout_s)
            if not ready:
                raise NodeFailure(
                    "runtime",
                    self._round,
                    f"training exceeded runtime.round_timeout_s={self.cfg.round_timeout_s}",
                )
            chunk, worker, update_ref, attempt = pending.pop(ready[0])
            part = chunks[chunk]
            try:
                # a chunk whose retry kills its fresh worker too fails the run (NodeFailure)
                what = "training" if attempt == 0 else "training (retry on a fresh worker)"
                metas[chunk] = self._get(ready[0], what, allow_death=attempt == 0)
            except _WorkerDied as died:
                # the pool is restored either way; the chunk is re-run or its clients count as failed
                self._replace(worker)
                policy = self.cfg.on_worker_failure
                self._events.append(
                    f"round {self._round}: worker {worker} died training {len(part)} clients "
                    f"({part[0].client_id}..); {policy}"
                )
                log.warning(
                    "round %d: worker %d died (%s); %s its %d clients",
                    self._round,
                    worker,
                    died,
                    policy,
                    len(part),
                )
                if policy == "retry":
                    submit(worker, chunk, 1)
                    continue
                metas[chunk] = [
                    msg.ClientMeta(
                        j.client_id,
                        j.parent_id,
                        0,
                        float("nan"),
                        0,
                        {},
                        error=f"WorkerDied: {died}",
                    )
                    for j in part
                ]
                update_ref = ray.put({})
            update_refs[chunk] = update_ref
            self._holds[update_ref.hex()] = (self._round, frozenset(j.client_id for j in part))
            nxt = next(queue, None)
            if nxt is not None:
                submit(worker, nxt)
        return [m for chunk_metas in metas for m in chunk_metas], update_refs

    def merge(
        self, tasks: Sequence[msg.MergeTask], sources: Sequence[Any]
    ) -> list[msg.MergeResult]:
        flat: list[Any] = []
        for s in sources:
            flat += s if isinstance(s, list) else [s]
        parts = split_even(tasks, len(self.actors))
        refs = [
            actor.merge.remote(part, *self.sources_for(part, flat))
            for actor, part in zip(self.actors, parts)
        ]
        out: list[msg.MergeResult] = []
        for chunk in self._get(refs, "aggregation"):
            out += chunk
        return out

    def sources_for(self, tasks: Sequence[msg.MergeTask], sources: Sequence[Any]) -> list[Any]:
        """The sources a worker merging ``tasks`` needs: the update objects that hold one of
        their expected senders (all, where unknown) and, of an inline mapping, those senders'
        entries. A merge reads only its expected senders' updates (attacks included), and the
        order of the sources is kept, so the pools agree on every sender a merge reads: the
        result is the same as sending every source, with each update sent to one worker
        instead of all of them (benchmarks/cluster)."""
        import ray

        wanted = {e.sender for t in tasks for e in t.expectations}
        out: list[Any] = []
        for s in sources:
            if isinstance(s, ray.ObjectRef):
                holds = self._holds.get(s.hex())
                if holds is None or not holds[1].isdisjoint(wanted):
                    out.append(s)
            elif isinstance(s, Mapping):
                out.append({k: v for k, v in s.items() if k in wanted})
            else:
                out.append(s)
        return out

    def evaluate(
        self, jobs: Sequence[msg.EvalJob], states: Mapping[str, State]
    ) -> list[tuple[str, dict[str, tuple[float, int]]]]:
        states_ref = self.put(dict(states))
        parts = split_even(jobs, len(self.actors))
        refs = [actor.evaluate.remote(part, states_ref) for actor, part in zip(self.actors, parts)]
        out = []
        for chunk in self._get(refs, "evaluation"):
            out += chunk
        return out

    def mix(
        self,
        tasks: Sequence[msg.MixTask],
        starts: Any,
        expectations: Mapping[str, Any],
        sources: Sequence[Any],
    ) -> list[msg.MixResult]:
        if tasks:
            self._round = tasks[0].round
        flat: list[Any] = []
        for s in sources:
            flat += s if isinstance(s, list) else [s]
        exp_ref = self.put(dict(expectations))
        parts = split_even(tasks, len(self.actors))
        refs = [
            actor.mix.remote(part, starts, exp_ref, *flat)
            for actor, part in zip(self.actors, parts)
        ]
        out: list[msg.MixResult] = []
        for chunk in self._get(refs, "gossip mixing"):
            out += chunk
        return out

    def average(self, task: msg.AverageTask, states: Any) -> tuple[float, State]:
        return self._get(self.actors[0].average.remote(task, states), "gossip averaging")

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._reaper is not None:  # a session this run started ends with it, as Flower's does
            ray.shutdown()  # (at exit Ray would first sleep 0.5 s for its log lines)
            self._reaper.terminate()  # nothing of the session is left to watch
            self._reaper.wait()
            self._reaper = None
