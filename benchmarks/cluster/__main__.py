"""``python -m benchmarks.cluster [--out DIR] [OVERRIDES...]``: what a run moves through Ray's
object store, per round (docs/cluster.md).

Runs the job (default config, unless overrides say otherwise) on a local Ray session through
a ``RayRuntime`` that counts, at each call the engine makes, the pickled size (protocol 5, as
Ray serializes) of what goes in and comes out: the states the driver ``put``s once per round,
the jobs, the updates and metas the workers return, what each merging worker receives, and
the merge results. Objects that reach a worker through a reference are counted once per
worker that receives them (on a cluster, each is a copy to that worker's node unless it is
already there; a merging worker is sent the update objects that hold its nodes' senders,
``RayRuntime.sources_for``). The once-per-run worker setup (config and federation) is counted too. Sizes
do not depend on the machine; the counts are per round, averaged over the run's rounds.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info

ROWS = {
    "setup": "worker setup: config and federation, once per run (ray.put)",
    "put_train": "driver put: the parents' states the round's clients train from",
    "put_eval": "driver put: the global state to evaluate",
    "jobs": "train jobs (task arguments)",
    "updates": "client updates back (one object per chunk of clients)",
    "metas": "client metas back (loss, sizes, privacy)",
    "merge_in": "merge: the updates each merging worker's nodes expect",
    "merge_tasks": "merge tasks (task arguments)",
    "merge_out": "merge results back to the driver (node states)",
}


def _size(obj: Any) -> int:
    import ray

    if isinstance(obj, ray.ObjectRef):
        obj = ray.get(obj)
    if isinstance(obj, list) and obj and all(isinstance(o, ray.ObjectRef) for o in obj):
        return sum(_size(o) for o in obj)
    return len(pickle.dumps(obj, protocol=5))


def _counting_runtime(cfg: Any) -> Any:
    from hierfed.runtime.ray import RayRuntime

    class Counting(RayRuntime):
        def __init__(self, rcfg: Any) -> None:
            super().__init__(rcfg)
            self.bytes: Counter[str] = Counter()
            self._evaluating = False

        def put(self, obj: Any) -> Any:
            self.bytes["put_eval" if self._evaluating else "put_train"] += _size(obj)
            return super().put(obj)

        def train(self, jobs: Any, states: Any) -> Any:
            self.bytes["jobs"] += _size(list(jobs))
            metas, refs = super().train(jobs, states)
            self.bytes["updates"] += _size(refs)
            self.bytes["metas"] += _size(metas)
            return metas, refs

        def sources_for(self, tasks: Any, sources: Any) -> list[Any]:
            out = super().sources_for(tasks, sources)  # what one merging worker is sent
            self.bytes["merge_in"] += sum(_size(s) for s in out)
            return out

        def merge(self, tasks: Any, sources: Any) -> Any:
            self.bytes["merge_tasks"] += _size(list(tasks))
            out = super().merge(tasks, sources)
            self.bytes["merge_out"] += _size(out)
            return out

        def evaluate(self, jobs: Any, states: Any) -> Any:
            self._evaluating = True
            try:
                return super().evaluate(jobs, states)
            finally:
                self._evaluating = False

    return Counting(cfg.runtime)


def measure(overrides: list[str], out_run: Path) -> dict[str, Any]:
    import ray

    from hierfed.config import load_config
    from hierfed.runtime.worker import WorkerSetup
    from hierfed.simulation import build_federation, run

    cfg = load_config(None, overrides, out=str(out_run))
    fed = build_federation(cfg)
    rt = _counting_runtime(cfg)
    setup = WorkerSetup(cfg, fed)
    rt.start(setup)
    try:
        res = run(cfg, runtime=rt, overwrite=True)
    finally:
        rt.shutdown()
        ray.shutdown()
    rounds = cfg.rounds
    per_round = {k: rt.bytes[k] // rounds for k in ROWS if k != "setup"}
    state = res.final_state
    return {
        "overrides": overrides,
        "topology": cfg.topology.name,
        "clients": len(fed.clients),
        "workers": len(rt.actors) or cfg.runtime.num_workers,
        "chunks_per_worker": cfg.runtime.chunks_per_worker,
        "rounds": rounds,
        "global_state_bytes": sum(
            t.numel() * t.element_size() for c in state.values() for t in c.values()
        ),
        "setup_bytes_once": _size(setup),
        "per_round_bytes": per_round,
        "per_round_total_bytes": sum(per_round.values()),
        "ledger_bytes_per_round": sum(m.get("bytes_total", 0) for m in res.metrics[1:]) // rounds,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['topology']}, {result['clients']} clients, {result['workers']} workers, "
        f"{result['rounds']} rounds; global state {result['global_state_bytes'] / 1024:.1f} KiB",
        f"  {ROWS['setup']:<66} {result['setup_bytes_once'] / 1024:>9.1f} KiB",
    ]
    for k, v in result["per_round_bytes"].items():
        lines.append(f"  {ROWS[k]:<66} {v / 1024:>9.1f} KiB/round")
    lines.append(f"  {'total per round':<66} {result['per_round_total_bytes'] / 1024:>9.1f} KiB")
    lines.append(
        f"  {'(the ledger: the federation' + chr(39) + 's own traffic)':<66} "
        f"{result['ledger_bytes_per_round'] / 1024:>9.1f} KiB/round"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    p.add_argument("--out", default="benchmarks/out/cluster", help="folder for results.json")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = list(args.overrides) or ["rounds=2", "eval.personalized=False"]
    if not any(o.startswith("runtime.num_workers=") for o in overrides):
        overrides.append("runtime.num_workers=2")
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:  # the run folder itself is not a result
        result = measure(["runtime.name=ray", *overrides], Path(tmp) / "run")
    (out / "results.json").write_text(json.dumps({"machine": machine, **result}, indent=1) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
