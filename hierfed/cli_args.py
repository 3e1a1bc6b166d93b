"""The command line's subcommands and their arguments, as one table.

``hierfed.cli`` builds its parser from ``SUBCOMMANDS`` (``add_subcommands``) and dispatches
on the subcommand's name; a new subcommand is one entry here plus its handler there.
"""

from __future__ import annotations

from typing import Any

Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Arg:
    """One ``add_argument`` call of a subcommand: its name or flags, and its keyword options."""
    return flags, options


RUN_DIR = arg("run_dir")
# subcommand -> (help, its arguments in order), in the order ``--help`` lists them; ``unlearn``
# and ``deploy`` come last and declare their own (hierfed.unlearning.command.add_parser,
# hierfed.deploy.command.add_parser: certs, superlink, register, supernode, run)
SUBCOMMANDS: dict[str, tuple[str, list[Arg]]] = {
    "run": (
        "run a federation",
        [
            arg("--topology", default=None, help="registered topology (star, hierarchical, ...)"),
            arg("--config", default=None, help="YAML config file"),
            arg("--out", default=None, help="run folder (default runs/<timestamp>-<topology>)"),
            arg("--quiet", action="store_true", help="no progress bar"),
            arg(
                "--resume",
                default=None,
                metavar="RUN_DIR",
                help="continue a run from its newest checkpoint (uses RUN_DIR/config.yaml)",
            ),
            arg(
                "--overwrite",
                action="store_true",
                help="replace the run in a non-empty --out (otherwise refused)",
            ),
            arg(
                "overrides",
                nargs="*",
                help="key=value overrides, e.g. rounds=3 data.num_institutions=6",
            ),
        ],
    ),
    "show-config": (
        "print the resolved config",
        [
            arg("--topology", default=None),
            arg("--config", default=None),
            arg("overrides", nargs="*"),
        ],
    ),
    "list": ("list registered topologies, aggregators, datasets, ...", []),
    "report": ("print the tables of a finished run folder", [RUN_DIR]),
    "export": (
        "export a run's model: peft adapter, components, model card",
        [
            RUN_DIR,
            arg("--out", required=True, help="a new (or empty) folder to write"),
            arg(
                "--personalized",
                nargs="+",
                default=[],
                metavar="NODE",
                help="also export these clients' (or tier nodes') personalized models; 'all' = every client",
            ),
        ],
    ),
    "evaluate": (
        "evaluate a run's saved model on a test split",
        [
            RUN_DIR,
            arg("--client", default=None, help="a client's personalized model, on its own rows"),
            arg(
                "--data",
                nargs="+",
                default=[],
                metavar="KEY=VALUE",
                help="data.* overrides: evaluate on another configured dataset (same modalities, tasks)",
            ),
            arg("--json", action="store_true", help="print the metrics as one JSON object"),
        ],
    ),
    "predict": (
        "predict with a run's saved model on rows of a JSONL file",
        [
            RUN_DIR,
            arg("--input", required=True, help="JSON Lines, one row per line (docs/python-api.md)"),
            arg("--out", default=None, help="write JSONL here instead of printing it"),
            arg("--task", nargs="+", default=None, help="only these tasks"),
            arg("--client", default=None, help="use this client's personalized model"),
        ],
    ),
    "explain": (
        "attribution, component ablation and equity of a run",
        [
            RUN_DIR,
            arg("--out", default=None, help="output folder (default RUN_DIR/explain)"),
            arg("--group", action="append", default=None, help="group column (repeatable)"),
            arg("--max-rows", type=int, default=32, help="test rows per client explained"),
            arg("--steps", type=int, default=32, help="Integrated Gradients steps"),
            arg("--no-plots", action="store_true", help="tables only (no matplotlib)"),
        ],
    ),
}


def add_subcommands(sub: Any) -> None:
    """Add every subcommand of ``SUBCOMMANDS``, with its arguments, to ``sub`` (the parser's
    ``add_subparsers()``)."""
    for name, (help_text, arguments) in SUBCOMMANDS.items():
        cmd = sub.add_parser(name, help=help_text)
        for flags, options in arguments:
            cmd.add_argument(*flags, **options)
