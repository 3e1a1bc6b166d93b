"""The three implementations of the overhead workload; each runs in its own process.

Each returns a record: ``startup_s`` (process creation -> first round may start: imports,
data, model, and for hierfed/Flower the Ray start and workers), ``round_s`` (wall time of each
round), ``accuracy`` (final global model on the global held-out rows) and writes the final
trainable state as a flat float64 vector (``final.npy``) so the parent can compare the math.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from benchmarks.overhead.workload import (
    Workload,
    accuracy,
    build,
    cohort,
    local_train,
    trainable_params,
    workload_config,
)
from hierfed.update import flat_state


def _since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


def _save_final(out: Path, state: dict[str, dict[str, torch.Tensor]]) -> None:
    flat = flat_state(state)
    vec = np.concatenate([flat[k].detach().double().reshape(-1).numpy() for k in sorted(flat)])
    np.save(out / "final.npy", vec)


def run_floor(w: Workload, out: Path) -> dict[str, Any]:
    """A plain single-process, single-thread PyTorch FedAvg loop."""
    torch.set_num_threads(1)
    cfg = workload_config(w, runtime="local")
    fed, model, comps = build(cfg)
    params = trainable_params(model, comps)
    glob = [p.detach().clone() for p in params]
    ids = [c.id for c in fed.clients]
    startup = _since_process_start()
    round_s = []
    for rnd in range(1, w.rounds + 1):
        t0 = time.perf_counter()
        acc: list[torch.Tensor] | None = None
        total_w = 0.0
        for cid in cohort(cfg, ids, rnd):  # sorted: the same summation order as hierfed
            data = fed.train[cid]
            new, _ = local_train(model, params, glob, data, cfg=cfg, key=(rnd, 0, cid))
            n = float(len(data))
            wd = [(a - b) * n for a, b in zip(new, glob)]
            acc = wd if acc is None else [x + y for x, y in zip(acc, wd)]
            total_w += n
        assert acc is not None
        glob = [g + a / total_w for g, a in zip(glob, acc)]
        round_s.append(time.perf_counter() - t0)
    acc_final = accuracy(model, params, glob, fed.global_test)
    _save_final(out, model.component_state())
    return {"startup_s": startup, "round_s": round_s, "accuracy": acc_final}


def run_hierfed(w: Workload, out: Path) -> dict[str, Any]:
    """hierfed's star topology on the Ray runtime, through the normal ``simulation.run``."""
    from hierfed.simulation import run

    cfg = workload_config(w, runtime="ray")
    marks: dict[str, float] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "round" and data["round"] == 0:
            marks["startup"] = _since_process_start()

    res = run(cfg, on_event=on_event, write=False)
    round_s = [float(r["wall_s"]) for r in res.metrics[1:]]
    _save_final(out, res.final_state)
    return {
        "startup_s": marks["startup"],
        "round_s": round_s,
        "accuracy": res.final_metrics["label"],
        "workers": int(os.environ.get("BENCH_WORKERS", "0")) or None,
    }


# ------------------------------------------------------------------------ Flower

_CACHE: dict[str, Any] = {}


def _flower_setup(w: Workload) -> tuple[Any, Any, list, list[str]]:
    """Per process (each Ray actor builds its own once): config, federation, model, params."""
    key = w.tag
    if key not in _CACHE:
        torch.set_num_threads(1)
        cfg = workload_config(w, runtime="local")
        fed, model, comps = build(cfg)
        params = trainable_params(model, comps)
        _CACHE[key] = (cfg, fed, model, params, [c.id for c in fed.clients])
    return _CACHE[key]


def _to_record(values: list[torch.Tensor]) -> Any:
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict((f"p{i:03d}", v.detach().clone()) for i, v in enumerate(values)))


def _from_record(rec: Any) -> list[torch.Tensor]:
    sd = rec.to_torch_state_dict()
    return [sd[k] for k in sorted(sd)]


def run_flower(w: Workload, out: Path) -> dict[str, Any]:
    """Flower's simulation engine (``run_simulation``, Ray backend), FedAvg, the same local loop."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    cfg, fed, model, params, ids = _flower_setup(w)
    marks: dict[str, Any] = {"evals": [], "acc": None, "final": None}
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        wcfg, wfed, wmodel, wparams, wids = _flower_setup(w)
        cid = wids[int(context.node_config["partition-id"])]
        rnd = int(msg.content["config"]["server-round"])
        start = _from_record(msg.content["arrays"])
        data = wfed.train[cid]
        new, loss = local_train(wmodel, wparams, start, data, cfg=wcfg, key=(rnd, 0, cid))
        content = RecordDict(
            {
                "arrays": _to_record(new),
                "metrics": MetricRecord({"train_loss": loss, "num-examples": len(data)}),
            }
        )
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        marks["evals"].append(time.perf_counter())
        if server_round == 0:
            marks["startup"] = _since_process_start()
        if server_round == w.rounds:
            values = _from_record(arrays)
            marks["acc"] = accuracy(model, params, values, fed.global_test)
            marks["final"] = model.component_state()
        return None

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        frac = w.participation
        strategy = FedAvg(
            fraction_train=frac,
            fraction_evaluate=0.0,
            min_train_nodes=max(1, int(frac * w.clients)),
            min_available_nodes=w.clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=_to_record([p.detach() for p in params]),
            num_rounds=w.rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=evaluate_fn,
        )

    os.environ.setdefault(
        "RAY_worker_niceness", "0"
    )  # the same worker priority hierfed's Ray runtime uses
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=w.clients,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
        },
    )
    ev = marks["evals"]
    round_s = [b - a for a, b in zip(ev[:-1], ev[1:])]
    if marks["final"] is None:
        raise RuntimeError("Flower's simulation ended before the last round was evaluated")
    _save_final(out, marks["final"])
    return {"startup_s": marks["startup"], "round_s": round_s, "accuracy": marks["acc"]}


IMPLS = {"floor": run_floor, "hierfed": run_hierfed, "flower": run_flower}
