"""``python -m hierfed unlearn RUN_DIR --client ID [--institution ID ...] --out NEW_DIR``.

The CLI side of unlearning (the library never prints): parses the request, runs the exact
replay (``hierfed.unlearning.replay``), writes the certificate and prints what was reused,
replayed and measured.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

R = TypeVar("R")


def add_parser(sub: Any) -> None:
    """Register the ``unlearn`` subcommand on the CLI's subparsers."""
    u = sub.add_parser(
        "unlearn",
        help="forget clients or institutions of a finished run (exact replay + certificate)",
    )
    u.add_argument("run_dir", help="the finished run folder (read only)")
    u.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="ID",
        help="a client to forget (full id, or its unique last part); repeatable",
    )
    u.add_argument(
        "--institution",
        action="append",
        default=[],
        metavar="ID",
        help="a tier node whose clients to forget (e.g. global/inst-02 or inst-02); repeatable",
    )
    u.add_argument("--out", required=True, help="the new run folder (must not exist)")
    u.add_argument("--no-mia", action="store_true", help="skip the membership-inference check")
    u.add_argument(
        "--approximate",
        type=int,
        default=None,
        metavar="K",
        help="approximate instead (gradient ascent + K repair rounds; not certified exact)",
    )
    u.add_argument(
        "--exact-dir", default=None, help="with --approximate: an exact replay to measure against"
    )
    u.add_argument("--quiet", action="store_true")
    u.add_argument(
        "overrides", nargs="*", help="runtime.*/checkpoint.* overrides, e.g. runtime.num_workers=2"
    )


def _forget(unlearn: Callable[..., R], args: argparse.Namespace, **extra: Any) -> R:
    """``unlearn`` (exact or approximate) called on the request the command line made."""
    return unlearn(
        Path(args.run_dir),
        out=Path(args.out),
        clients=args.client,
        nodes=args.institution,
        overrides=args.overrides,
        **extra,
    )


def main(console: Console, args: argparse.Namespace) -> int:
    from hierfed.unlearning.certificate import CERTIFICATE, certify
    from hierfed.unlearning.replay import unlearn_exact

    if not args.quiet:
        console.print(f"unlearning from {args.run_dir} into {args.out} ...", style="dim")
    if args.approximate is not None:
        return _approximate(console, args)
    res = _forget(unlearn_exact, args)
    cert = certify(res, Path(args.run_dir), mia=not args.no_mia)
    table = Table(title=f"exact unlearning: {', '.join(cert['removed'])}")
    table.add_column("")
    table.add_column("value")
    rounds, comp = cert["rounds"], cert["compute"]
    frm = cert["replayed_from"]
    table.add_row("clients removed", str(len(cert["removed_clients"])))
    table.add_row("first round with their data", str(cert["first_round_with_their_data"]))
    table.add_row(
        "replayed from",
        f"round {frm['round']}" + (f" ({frm['sha256'][:12]})" if frm["sha256"] else ""),
    )
    table.add_row("rounds reused / replayed", f"{rounds['reused']} / {rounds['replayed']}")
    orig = comp["original_run_wall_s"]
    table.add_row(
        "wall time (replay / original run)",
        f"{comp['replay_wall_s']:.1f}s / " + (f"{orig:.1f}s" if orig is not None else "?"),
    )
    ver = cert["verification"]
    mia = ver.get("membership_inference")
    if mia:
        table.add_row(
            "membership AUC (original -> unlearned)",
            f"{mia['original']['auc']:.3f} -> {mia['unlearned']['auc']:.3f}",
        )
    table.add_row("L2 distance to the original", f"{ver['l2_distance_total']:.4g}")
    table.add_row("final state sha256", cert["final_state_sha256"][:16])
    console.print(table)
    console.print(f"certificate: {Path(args.out) / CERTIFICATE}", highlight=False)
    return 0


def _approximate(console: Console, args: argparse.Namespace) -> int:
    from hierfed.unlearning.approx import certify_approximate, unlearn_approximate
    from hierfed.unlearning.certificate import CERTIFICATE

    res = _forget(unlearn_approximate, args, repair_rounds=args.approximate)
    cert = certify_approximate(
        res, Path(args.run_dir), exact_dir=args.exact_dir, mia=not args.no_mia
    )
    table = Table(title=f"APPROXIMATE unlearning: {', '.join(cert['removed'])}")
    table.add_column("")
    table.add_column("value")
    table.add_row("repair rounds", str(res.repair_rounds))
    table.add_row("wall time (ascent + repair)", f"{res.wall_s:.1f}s")
    for k, v in cert["verification"]["l2_distance_total"].items():
        table.add_row(f"L2 distance, {k.replace('_', ' ')}", f"{v:.4g}")
    mia = cert["verification"].get("membership_inference")
    if mia:
        for k in ("original", "approximate", "exact"):
            if k in mia:
                table.add_row(f"membership AUC, {k}", f"{mia[k]['auc']:.3f}")
    console.print(table)
    console.print(f"certificate: {Path(args.out) / CERTIFICATE}", highlight=False)
    return 0
