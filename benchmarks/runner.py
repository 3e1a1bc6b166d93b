"""Runs a suite: every configuration x seed through ``hierfed.simulation.run``.

One Ray session serves the whole suite (each run's RayRuntime finds it up, starts its own
worker actors for its config, and kills them at the end), so Ray starts once, not per run.
A configuration whose topology is not registered, or whose config does not validate, is
recorded as *skipped* with the reason; a run that fails is recorded as *failed*; the suite
goes on either way.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from benchmarks.machine import machine_info
from benchmarks.suite import Entry, Suite, load_suite
from hierfed.errors import HierfedError

log = logging.getLogger(__name__)


def _registered(topology: str) -> str | None:
    """None if ``topology`` is registered, else the reason it is not."""
    from hierfed import plugins  # noqa: F401
    from hierfed.registry import TOPOLOGIES

    if topology in TOPOLOGIES:
        return None
    return f"topology '{topology}' is not registered (known: {', '.join(TOPOLOGIES.names())})"


def _start_ray(suite: Suite) -> bool:
    if suite.runtime != "ray":
        return False
    import ray

    if ray.is_initialized():
        return False
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    return True


def run_suite(
    path: str | Path,
    out: str | Path,
    *,
    console: Console | None = None,
    runtime: str | None = None,
    tensorboard: bool = False,
) -> Path:
    """Run the suite in ``path`` into folder ``out``; returns ``out``. Writes status.json,
    machine.json, per-run metrics under metrics/, and (through report.build) tidy.csv,
    the plots and REPORT.md. ``tensorboard``: every run also logs TensorBoard scalars into
    its run folder (``tensorboard --logdir OUT/runs`` shows them side by side)."""
    from benchmarks.report import build
    from hierfed.config import load_config
    from hierfed.simulation import run

    suite = load_suite(path)
    if (
        runtime is not None
    ):  # e.g. --runtime local on a busy laptop: same results, no actor start-up per run
        suite = replace(suite, runtime=runtime)
    out = Path(out)
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, out / "suite.yaml")
    console = console or Console()
    before = machine_info()
    plans: list[tuple[Entry, int, Any, str | None]] = []
    for entry in suite.entries:
        reason = _registered(entry.topology)
        for seed in suite.seeds:
            cfg = None
            if reason is None:
                try:
                    cfg = load_config(
                        None,
                        suite.overrides(entry, seed)
                        + (["logging.tensorboard=true"] if tensorboard else []),
                        topology=entry.topology,
                        out=str(out / "runs" / entry.name / f"seed-{seed}"),
                    )
                except HierfedError as exc:
                    reason = f"config does not validate: {exc}"
            plans.append((entry, seed, cfg, reason))
    total_rounds = sum(cfg.rounds for _, _, cfg, r in plans if r is None and cfg is not None)
    status: list[dict[str, Any]] = []
    started_ray = False
    t_suite = time.perf_counter()
    try:
        started_ray = _start_ray(suite) if total_rounds else False
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rounds"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as prog:
            bar = prog.add_task(suite.name, total=total_rounds or 1)
            for entry, seed, cfg, reason in plans:
                rec: dict[str, Any] = {
                    "config": entry.name,
                    "topology": entry.topology,
                    "seed": seed,
                }
                if reason is not None or cfg is None:
                    rec.update(status="skipped", reason=reason)
                    status.append(rec)
                    prog.console.print(f"[yellow]skipped[/] {entry.name} seed {seed}: {reason}")
                    continue
                prog.update(bar, description=f"{suite.name}: {entry.name} seed {seed}")

                def on_event(kind: str, data: dict[str, Any]) -> None:
                    if kind == "round" and data.get("round", 0) > 0:
                        prog.advance(bar)

                t0 = time.perf_counter()
                done_before = prog.tasks[0].completed
                try:
                    res = run(cfg, on_event=on_event)
                    rec.update(status="ok", wall_s=time.perf_counter() - t0, rounds=cfg.rounds)
                    run_dir = Path(cfg.out or "")
                    shutil.copyfile(
                        run_dir / "metrics.jsonl",
                        out / "metrics" / f"{entry.name}__seed{seed}.jsonl",
                    )
                    shutil.copyfile(
                        run_dir / "summary.json",
                        out / "metrics" / f"{entry.name}__seed{seed}.summary.json",
                    )
                    rec["final"] = res.final_metrics
                except Exception as exc:  # a failed run is a result, not the end of the suite
                    rec.update(
                        status="failed",
                        reason=f"{type(exc).__name__}: {exc}",
                        wall_s=time.perf_counter() - t0,
                    )
                    log.debug("run failed: %s", traceback.format_exc())
                    prog.console.print(f"[red]failed[/] {entry.name} seed {seed}: {rec['reason']}")
                    prog.update(bar, completed=done_before + cfg.rounds)
                status.append(rec)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    after = machine_info()
    (out / "status.json").write_text(json.dumps(status, indent=1))
    (out / "machine.json").write_text(
        json.dumps(
            {
                "before": before,
                "after": after,
                "suite_wall_s": time.perf_counter() - t_suite,
                "runtime": suite.runtime,
            },
            indent=1,
        )
    )
    build(out)
    return out
