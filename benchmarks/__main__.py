"""``python -m benchmarks run SUITE.yaml [--out DIR]`` and ``python -m benchmarks report DIR``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from rich.console import Console

from hierfed.errors import HierfedError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description="hierfed benchmark harness"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a suite (benchmarks/suites/*.yaml)")
    r.add_argument("suite")
    r.add_argument(
        "--out", default=None, help="results folder (default benchmarks/out/<suite>-<timestamp>)"
    )
    r.add_argument(
        "--runtime",
        choices=["ray", "local"],
        default=None,
        help="override the suite's runtime (results do not depend on it; wall times do)",
    )
    r.add_argument(
        "--tensorboard",
        action="store_true",
        help="log every run's per-round scalars for TensorBoard (in OUT/runs/<config>/seed-N)",
    )
    rep = sub.add_parser("report", help="rebuild tidy.csv, plots and REPORT.md of a results folder")
    rep.add_argument("results_dir")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("HIERFED_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s"
    )
    console = Console()
    try:
        if args.cmd == "report":
            from benchmarks.report import build

            out = build(args.results_dir)
        else:
            from benchmarks.runner import run_suite

            out_dir = (
                args.out or f"benchmarks/out/{Path(args.suite).stem}-{datetime.now():%Y%m%d-%H%M%S}"
            )
            out = run_suite(
                args.suite,
                out_dir,
                console=console,
                runtime=args.runtime,
                tensorboard=args.tensorboard,
            )
    except HierfedError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    console.print(f"report: {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
