"""Command line: ``python -m hierfed run|list|show-config|report|explain|export|evaluate|predict``.

The CLI is the only place that prints: a rich progress bar over rounds and the final tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hierfed.cli_args import add_subcommands
from hierfed.deploy import command as deploy_cmd
from hierfed.errors import HierfedError
from hierfed.unlearning import command as unlearn_cmd


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hierfed",
        description="Hierarchical multi-modal multi-task federated fine-tuning.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    add_subcommands(sub)
    unlearn_cmd.add_parser(sub)
    deploy_cmd.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`run --quiet rounds=3`): argparse leaves those in `extra`
    stray = [x for x in extra if x.startswith("-") or "=" not in x]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    console = Console()
    logging.basicConfig(
        level=os.environ.get("HIERFED_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.cmd == "list":
            return _list(console)
        if args.cmd == "show-config":
            from hierfed.config import load_config, to_yaml

            cfg = load_config(args.config, args.overrides, topology=args.topology)
            console.print(to_yaml(cfg), markup=False, highlight=False)
            return 0
        if args.cmd == "report":
            return _report(console, Path(args.run_dir))
        if args.cmd == "export":
            return _export(console, args)
        if args.cmd == "evaluate":
            return _evaluate(console, args)
        if args.cmd == "predict":
            return _predict(console, args)
        if args.cmd == "explain":
            return _explain(console, args)
        if args.cmd == "unlearn":
            return unlearn_cmd.main(console, args)
        if args.cmd == "deploy":
            return deploy_cmd.main(args)
        return _run(console, args)
    except HierfedError as exc:
        return _print_error(console, exc)


def _print_error(console: Console, exc: HierfedError) -> int:
    """One line, never a traceback; markup off, so a value such as ``x[/]`` in the
    message is printed as it is instead of being read as rich markup. Exit status 2 for a
    refusal (bad input), 3 for a run that collapsed (``RunCollapsed``)."""
    from hierfed.errors import RunCollapsed

    text = " ".join(str(exc).split())  # one line whatever the message holds
    console.print(f"error: {text}", markup=False, highlight=False, soft_wrap=True, style="bold red")
    return 3 if isinstance(exc, RunCollapsed) else 2


def _list(console: Console) -> int:
    from hierfed import plugins  # noqa: F401
    from hierfed.attacks import ATTACKS
    from hierfed.registry import (
        AGGREGATORS,
        BACKBONES,
        DATASETS,
        POSTPROCESSORS,
        SERVER_OPTIMIZERS,
        TOPOLOGIES,
    )

    table = Table(title="registered plug-ins")
    table.add_column("kind")
    table.add_column("names")
    for reg in (
        TOPOLOGIES,
        AGGREGATORS,
        SERVER_OPTIMIZERS,
        POSTPROCESSORS,
        DATASETS,
        BACKBONES,
        ATTACKS,
    ):
        table.add_row(reg.kind, ", ".join(reg.names()))
    console.print(table)
    return 0


def _run(console: Console, args: argparse.Namespace) -> int:
    from hierfed.config import load_config
    from hierfed.simulation import personalized_means, run

    resume = args.resume is not None
    if resume:
        run_dir = Path(args.resume)
        if args.config or args.topology or args.out:
            raise HierfedError(
                "--resume takes the run folder's own config.yaml; drop --config/--topology/--out"
            )
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise HierfedError(
                f"'{run_dir}' is not a run folder (no config.yaml); give the folder a run wrote"
            )
        cfg = load_config(cfg_path, args.overrides, out=str(run_dir))
    else:
        cfg = load_config(args.config, args.overrides, topology=args.topology, out=args.out)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.quiet,
    )
    task_id = None

    def on_event(kind: str, data: dict[str, Any]) -> None:
        nonlocal task_id
        if kind == "launch":
            console.print(
                f"starting the {data['runtime']} runtime's workers (each builds the model) ...",
                style="dim",
                highlight=False,
            )
        elif kind == "start":
            f = data["federation"]
            # the tiers the topology runs (star skips the middle ones), with the members of each
            used = {t: n for t, n in f["tiers"].items() if t in data["tiers"]}
            skipped = [t for t in f["tiers"] if t not in data["tiers"]]
            tiers = ", ".join(f"{t} {n}" for t, n in used.items())
            if skipped:
                tiers += f" (the data's {', '.join(skipped)} tier{'s' * (len(skipped) > 1)} unused)"
            console.print(
                f"[bold]hierfed[/] {cfg.topology.name} on {f['dataset']}: tiers {tiers}, "
                f"{f['train_rows']} training rows, tasks {', '.join(f['tasks'])}; trainable "
                f"{data['trainable']:,} parameters on a frozen {data['backbone']:,}-parameter backbone",
                highlight=False,
            )
            progress.start()
            task_id = progress.add_task("rounds", total=cfg.rounds, info="evaluating round 0")
        elif kind == "round":
            g = data.get("global") or {}
            info = "  ".join(f"{t}={v:.3f}" for t, v in sorted(g.items()))
            if data["round"] == 0:
                console.print(f"round 0 (untrained): {info}", highlight=False, soft_wrap=True)
                return
            loss = data.get("train_loss")
            line = (
                f"round {data['round']}: loss={loss:.3f} {info}  bytes={_fmt_bytes(data.get('bytes_total', 0))}"
                f"  clients={data.get('participants')}"
            )
            if data.get("sim_time_s"):
                line += f"  sim={data['sim_time_s']:.2f}s"
            for key in ("rejected", "failed", "dropped", "late"):
                if data.get(key):
                    line += f"  {key}={data[key]}"
            if "consensus_distance" in data:
                line += f"  consensus={data['consensus_distance']:.3g}"
            dp = data.get("dp_sample")
            if dp:
                line += f"  max-eps={dp['max_epsilon']:.2f} (sample-level)"
                if dp.get("sat_out"):
                    line += f" budget-spent={len(dp['sat_out'])}"
            worst = data.get("node_metric_worst")
            if worst:
                line += "  worst-node " + " ".join(f"{t}={v:.3f}" for t, v in sorted(worst.items()))
            console.print(line, highlight=False, soft_wrap=True)
            if data.get("worker_failures"):
                for ev in data["worker_failures"]:
                    console.print(f"  [yellow]recovered:[/] {ev}", highlight=False, soft_wrap=True)
            assert task_id is not None
            progress.update(task_id, advance=1, info=info)
        elif kind == "resume":
            console.print(f"resuming after round {data['round']}", highlight=False)
            assert task_id is not None
            progress.update(task_id, completed=data["round"])
        elif kind == "end":
            progress.stop()

    try:
        result = run(cfg, on_event=on_event, resume=resume, overwrite=args.overwrite)
    finally:
        progress.stop()
    _print_tables(
        console,
        result.initial_metrics,
        result.final_metrics,
        personalized_means(result.personalized),
        result.ledger.by_edge(),
        result.ledger.by_component(),
    )
    console.print(f"run folder: {result.out_dir}", highlight=False)
    return 0


def _print_tables(
    console: Console, initial: dict, final: dict, personal: dict, by_edge: dict, by_comp: dict
) -> None:
    t = Table(
        title="held-out metrics (global test set; personalized = mean over clients' own test rows)"
    )
    for col in ("task", "untrained", "final global", "personalized"):
        t.add_column(col)
    for task in sorted(final):
        p = personal.get(task)
        t.add_row(
            task,
            f"{initial.get(task, float('nan')):.3f}",
            f"{final[task]:.3f}",
            "-" if p is None else f"{p:.3f}",
        )
    console.print(t)
    console.print(_bytes_table("bytes moved per tier edge (all rounds)", "edge", by_edge))
    console.print(_bytes_table("bytes per component", "component", by_comp))


def _bytes_table(title: str, key: str, sizes: dict) -> Table:
    """One row per ``key`` value with its size in bytes, human-readable."""
    table = Table(title=title)
    table.add_column(key)
    table.add_column("bytes", justify="right")
    for k, n in sizes.items():
        table.add_row(k, _fmt_bytes(n))
    return table


def _report(console: Console, run_dir: Path) -> int:
    from hierfed.errors import HierfedError as _E

    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise _E(f"'{run_dir}' is not a finished run folder (no summary.json)")
    s = json.loads(summary_path.read_text())
    _print_tables(
        console,
        s["initial"],
        s["final"],
        s.get("personalized_mean", {}),
        s["bytes_by_edge"],
        s["bytes_by_component"],
    )
    if s.get("equity"):  # per institution and group (hierfed/explain/equity.py)
        from hierfed.explain.equity import equity_tables

        for table in equity_tables(s["equity"]):
            console.print(table)
    if (run_dir / "continual.json").is_file():  # accuracy matrix, forgetting (hierfed/continual)
        from hierfed.continual.report import continual_tables

        for item in continual_tables(run_dir):
            console.print(item)
    return 0


def _explain(console: Console, args: argparse.Namespace) -> int:
    from hierfed.explain.report import explain_run

    dest = explain_run(
        args.run_dir,
        out=args.out,
        groups=args.group,
        max_rows=args.max_rows,
        n_steps=args.steps,
        plots=not args.no_plots,
    )
    console.print(f"explain tables and plots: {dest}", highlight=False)
    return 0


def _export(console: Console, args: argparse.Namespace) -> int:
    from hierfed.export import export_run

    written = export_run(args.run_dir, args.out, personalized=args.personalized)
    for folder in written:
        console.print(f"wrote {folder}", highlight=False)
    return 0


def _evaluate(console: Console, args: argparse.Namespace) -> int:
    from hierfed.inference import evaluate_run, load_run

    metrics = evaluate_run(load_run(args.run_dir, data=args.data), client=args.client)
    if args.json:  # one line, unwrapped, for scripts
        sys.stdout.write(json.dumps(metrics, sort_keys=True) + "\n")
        return 0
    where = (
        f"{args.client} (personalized) on its own test rows"
        if args.client
        else "global model on the global test split"
    )
    t = Table(title=where)
    t.add_column("task")
    t.add_column("metric")
    for task, value in sorted(metrics.items()):
        t.add_row(task, f"{value:.4f}")
    console.print(t)
    return 0


def _predict(console: Console, args: argparse.Namespace) -> int:
    from hierfed.checkpoint import atomic_write_text
    from hierfed.inference import load_run, predict, read_rows

    rows = read_rows(args.input)
    preds = predict(load_run(args.run_dir), rows, tasks=args.task, client=args.client)
    text = "".join(json.dumps(p, sort_keys=True) + "\n" for p in preds)
    if args.out:
        atomic_write_text(args.out, text)
        console.print(f"wrote {len(preds)} predictions to {args.out}", highlight=False)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
