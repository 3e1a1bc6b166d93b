"""Command line: ``python -m hierfed run|list|show-config|report``.

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
    r = sub.add_parser("run", help="run a federation")
    r.add_argument("--topology", default=None, help="registered topology (star, hierarchical, ...)")
    r.add_argument("--config", default=None, help="YAML config file")
    r.add_argument("--out", default=None, help="run folder (default runs/<timestamp>-<topology>)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a run from its newest checkpoint (uses RUN_DIR/config.yaml)",
    )
    r.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. rounds=3 data.num_institutions=6"
    )
    s = sub.add_parser("show-config", help="print the resolved config")
    s.add_argument("--topology", default=None)
    s.add_argument("--config", default=None)
    s.add_argument("overrides", nargs="*")
    sub.add_parser("list", help="list registered topologies, aggregators, datasets, ...")
    rep = sub.add_parser("report", help="print the tables of a finished run folder")
    rep.add_argument("run_dir")
    unlearn_cmd.add_parser(sub)
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
        if args.cmd == "unlearn":
            return unlearn_cmd.main(console, args)
        return _run(console, args)
    except HierfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2


def _list(console: Console) -> int:
    from hierfed import plugins  # noqa: F401
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
    for reg in (TOPOLOGIES, AGGREGATORS, SERVER_OPTIMIZERS, POSTPROCESSORS, DATASETS, BACKBONES):
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
        result = run(cfg, on_event=on_event, resume=resume)
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
    b = Table(title="bytes moved per tier edge (all rounds)")
    b.add_column("edge")
    b.add_column("bytes", justify="right")
    for e, n in by_edge.items():
        b.add_row(e, _fmt_bytes(n))
    console.print(b)
    c = Table(title="bytes per component")
    c.add_column("component")
    c.add_column("bytes", justify="right")
    for e, n in by_comp.items():
        c.add_row(e, _fmt_bytes(n))
    console.print(c)


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
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
