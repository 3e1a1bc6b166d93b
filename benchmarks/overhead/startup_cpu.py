"""Start-up CPU budget of hierfed on the overhead workload.

``python -m benchmarks.overhead.startup_cpu [--clients 1000] [--lora-rank 0]`` runs hierfed's star on the Ray
runtime for one round and, the moment round 0 may start, sums user+system CPU time over the
whole process tree (this driver, Ray's daemons and the worker actors), per process name.
With P CPUs, start-up can be no shorter than total CPU / P however well things overlap.
The first line printed names the machine and commit (a ``#`` comment, as in startup-cpu.txt).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import psutil

from benchmarks.machine import machine_info, provenance
from benchmarks.overhead.workload import Workload, workload_config


def _tree_cpu(me: psutil.Process) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.name()] = out.get(p.name(), 0.0) + t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead.startup_cpu")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--lora-rank", type=int, default=0, help="as in `overhead run --lora-rank`")
    args = ap.parse_args(argv)
    me = psutil.Process()
    imports_wall = time.time() - me.create_time()
    imports_cpu = sum(me.cpu_times()[:2])
    from hierfed.simulation import run

    seen: dict[str, Any] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "round" and data["round"] == 0:
            seen["wall"] = time.time() - me.create_time()
            seen["cpu"] = _tree_cpu(me)

    run(
        workload_config(Workload(args.clients, 1.0, rounds=1, lora_rank=args.lora_rank)),
        on_event=on_event,
        write=False,
    )
    cpu = seen["cpu"]
    cores = psutil.cpu_count() or 1
    # taken after the run so that its git calls do not count in the figures below
    print("# " + provenance(machine_info(), source="taken after the run"))
    print(f"driver imports: wall {imports_wall:.2f} s, CPU {imports_cpu:.2f} s")
    print(f"start-up: wall {seen['wall']:.2f} s, process-tree CPU {sum(cpu.values()):.2f} s")
    print(f"lower bound on {cores} CPUs: {sum(cpu.values()) / cores:.2f} s")
    for name, secs in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {name:32s} {secs:6.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
