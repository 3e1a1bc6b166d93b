"""Unlearning on real data: forget one Chem97 school and one authority, exactly and approximately.

    python -m benchmarks.unlearning.forget [--leas 0] [--out benchmarks/results/unlearning]

Runs ``configs/chem97-hierarchical.yaml`` (all 131 authorities, or the first ``--leas``; every
checkpoint kept), then for a school and an authority first used in the run's second half (the
largest such; see ``_pick``):
the exact replay (``hierfed.unlearning``), a fresh run with them excluded from the start (to
check bit-identity and to time a full retrain), and the approximate method with one repair
round. It records wall times (time.perf_counter, each including the runtime's start-up),
rounds reused and replayed, the loss-based membership-inference AUC of the forgotten clients
under each model, the same AUC for clients the original run never drew (the level of a
never-trained client), the others' personalized accuracy before and after, and the L2
distances. Results: ``results.json`` and ``REPORT.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_info

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "chem97-hierarchical.yaml"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    out = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in out:
        m.pop("wall_s", None)
    return out


def _others_mean(run_dir: Path, removed: set[str]) -> dict[str, float]:
    """Mean personalized metric per task over the clients that were not removed."""
    per = json.loads((run_dir / "personalized.json").read_text())
    acc: dict[str, list[float]] = {}
    for cid, res in per.items():
        if cid in removed:
            continue
        for t, v in res.items():
            if v is not None:
                acc.setdefault(t, []).append(v)
    return {t: sum(v) / len(v) for t, v in sorted(acc.items())}


def _case(
    kind: str, target: str, original: Path, tmp: Path, overrides: list[str], orig_s: float
) -> dict[str, Any]:
    from hierfed.config import load_config
    from hierfed.simulation import run
    from hierfed.unlearning.approx import certify_approximate, unlearn_approximate
    from hierfed.unlearning.certificate import certify
    from hierfed.unlearning.replay import unlearn_exact

    flag = {"clients": [target]} if kind == "school" else {"nodes": [target]}
    exact_dir, fresh_dir, approx_dir = (
        tmp / f"{kind}-exact",
        tmp / f"{kind}-fresh",
        tmp / f"{kind}-approx",
    )
    res = unlearn_exact(original, out=exact_dir, **flag)
    cert = certify(res, original)
    t0 = time.perf_counter()
    run(load_config(CONFIG, [*overrides, f"exclude=[{target}]"], out=str(fresh_dir)))
    fresh_s = time.perf_counter() - t0
    approx = unlearn_approximate(original, out=approx_dir, repair_rounds=1, **flag)
    acert = certify_approximate(approx, original, exact_dir=exact_dir)
    removed = set(cert["removed_clients"])
    mia = cert["verification"]["membership_inference"]
    return {
        "kind": kind,
        "removed": target,
        "removed_clients": len(removed),
        "removed_train_rows": mia["rows"]["members"],
        "first_round_with_their_data": cert["first_round_with_their_data"],
        "rounds": cert["rounds"],
        "replayed_from": cert["replayed_from"],
        "bit_identical_to_fresh_run": {
            "final_state": _sha(exact_dir / "final_state.safetensors")
            == _sha(fresh_dir / "final_state.safetensors"),
            "metrics": _metrics(exact_dir) == _metrics(fresh_dir),
            "ledger": (exact_dir / "ledger.csv").read_bytes()
            == (fresh_dir / "ledger.csv").read_bytes(),
        },
        "wall_s": {
            "exact_replay": res.wall_s,
            "full_retrain": fresh_s,
            "original_run": orig_s,
            "approximate": approx.wall_s,
        },
        "mia_auc": {
            "original": mia["original"]["auc"],
            "exact": mia["unlearned"]["auc"],
            "approximate": acert["verification"]["membership_inference"]["approximate"]["auc"],
        },
        "others_personalized_mean": {
            "original": _others_mean(original, removed),
            "exact": _others_mean(exact_dir, removed),
        },
        "global_final": cert["verification"]["final_metrics"],
        "l2_total": {
            "exact_vs_original": cert["verification"]["l2_distance_total"],
            **acert["verification"]["l2_distance_total"],
        },
    }


def _never_drawn_auc(original: Path, ids: list[str]) -> dict[str, Any]:
    """The AUC for clients the original run never trained on, under the original model."""
    from hierfed.checkpoint import load_state
    from hierfed.config import load_config
    from hierfed.simulation import build_federation
    from hierfed.unlearning.verify import membership_auc

    cfg = load_config(original / "config.yaml")
    state, _ = load_state(original / "final_state")
    res = membership_auc(cfg, build_federation(cfg), {"original": state}, ids)
    return {"clients": len(ids), **res["rows"], "auc": res["original"]["auc"]}


def _pick(original: Path, ids: list[str], rows: dict[str, int], rounds: int) -> tuple[str, int]:
    """Of ``ids`` first used in the second half of the run, the one with the most training
    rows (a membership test needs rows); else the one first used the latest."""
    from hierfed.ledger import CommLedger
    from hierfed.unlearning.replay import first_round_using

    ledger = CommLedger.load(original / "ledger.csv")
    used = {x: r for x in ids if (r := first_round_using(ledger, [x], frozenset())) is not None}
    late = [x for x in sorted(used) if used[x] > rounds // 2]
    if late:
        x = max(late, key=lambda k: rows[k])
    else:
        x = max(sorted(used), key=lambda k: used[k])
    return x, used[x]


def main(argv: list[str] | None = None) -> int:
    from hierfed.checkpoint import nulled
    from hierfed.config import load_config
    from hierfed.ledger import CommLedger
    from hierfed.simulation import build_federation, run
    from hierfed.unlearning.replay import first_round_using

    ap = argparse.ArgumentParser()
    ap.add_argument("--leas", type=int, default=0, help="first N authorities (0 = all 131)")
    ap.add_argument("--out", default="benchmarks/results/unlearning")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [
        f"data.options.leas={args.leas}",
        "checkpoint.every=1",
        "checkpoint.keep=100",
        "runtime.name=local",
    ]
    before = machine_info()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        original = tmp / "original"
        t0 = time.perf_counter()
        run(load_config(CONFIG, overrides, out=str(original)))
        orig_s = time.perf_counter() - t0
        ckpts = sorted((original / "checkpoints").glob("round-*"))
        ckpt_bytes = [sum(f.stat().st_size for f in c.rglob("*") if f.is_file()) for c in ckpts]
        fed = build_federation(load_config(CONFIG, overrides))
        schools = sorted(c.id for c in fed.clients)
        leas = sorted({"/".join(c.path[:2]) for c in fed.clients})
        ledger = CommLedger.load(original / "ledger.csv")
        never = [c for c in schools if first_round_using(ledger, [c], frozenset()) is None]
        rows: dict[str, int] = {}
        for c in fed.clients:
            rows[c.id] = c.num_train
            lea_id = "/".join(c.path[:2])
            rows[lea_id] = rows.get(lea_id, 0) + c.num_train
        rounds = load_config(CONFIG, overrides).rounds
        school, _ = _pick(original, schools, rows, rounds)
        lea, _ = _pick(original, leas, rows, rounds)
        cases = [
            _case("school", school, original, tmp, overrides, orig_s),
            _case("authority", lea, original, tmp, overrides, orig_s),
        ]
        baseline = _never_drawn_auc(original, never) if never else None
    result = {
        "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "overrides": overrides,
        "clients": len(schools),
        "original_run_s": orig_s,
        "checkpoint_bytes": {"per_round": ckpt_bytes, "total": sum(ckpt_bytes)},
        "never_drawn_baseline": baseline,
        "cases": cases,
        "machine_before": before,
        "machine_after": machine_info(),
    }
    (out / "results.json").write_text(json.dumps(nulled(result), indent=1))
    (out / "REPORT.md").write_text(_report(result))
    print(_report(result))
    return 0


def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}"


def _report(r: dict[str, Any]) -> str:
    m = r["machine_before"]
    base = r["never_drawn_baseline"]
    lines = [
        "# Unlearning on Chem97",
        "",
        f"Command: `python -m benchmarks.unlearning.forget`; commit {m['git_commit']}; "
        f"{m['cpu_count_logical']} logical CPUs, {m['memory_total_gib']} GiB, {m['platform']}; "
        f"load average before {m['load_avg_1_5_15']}, after {r['machine_after']['load_avg_1_5_15']}.",
        "",
        f"Config: `{r['config']}` with `{' '.join(r['overrides'])}` ({r['clients']} schools). "
        f"Original run: {r['original_run_s']:.1f} s. Wall times are single measurements on a "
        "shared 2-core machine, each including the local runtime's start-up.",
        "",
        f"Disk kept for the replay points: {len(r['checkpoint_bytes']['per_round'])} checkpoints, "
        f"{r['checkpoint_bytes']['total'] / 2**20:.1f} MiB in all "
        f"({max(r['checkpoint_bytes']['per_round']) / 2**20:.2f} MiB the largest).",
        "",
        "| forget | clients (train rows) | first used in round | rounds reused / replayed | bit-identical to a fresh run without them | exact replay s | full retrain s | approximate s | MIA AUC original → exact (approx.) | L2 exact↔original | L2 approx.↔exact |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["cases"]:
        bi = c["bit_identical_to_fresh_run"]
        ok = "yes (state, metrics, ledger)" if all(bi.values()) else f"NO {bi}"
        lines.append(
            f"| {c['kind']} `{c['removed']}` | {c['removed_clients']} ({c['removed_train_rows']}) | "
            f"{c['first_round_with_their_data']} | {c['rounds']['reused']} / {c['rounds']['replayed']} | {ok} | "
            f"{c['wall_s']['exact_replay']:.1f} | {c['wall_s']['full_retrain']:.1f} | {c['wall_s']['approximate']:.1f} | "
            f"{_fmt(c['mia_auc']['original'])} → {_fmt(c['mia_auc']['exact'])} ({_fmt(c['mia_auc']['approximate'])}) | "
            f"{c['l2_total']['exact_vs_original']:.4g} | {c['l2_total']['approximate_vs_exact']:.4g} |"
        )
    lines += ["", "Others' mean personalized metric (remaining schools, own held-out rows):", ""]
    for c in r["cases"]:
        o, e = c["others_personalized_mean"]["original"], c["others_personalized_mean"]["exact"]
        diffs = ", ".join(f"{t} {o[t]:.4f} → {e[t]:.4f}" for t in o if t in e)
        lines.append(f"* {c['kind']}: {diffs}")
    if base:
        lines += [
            "",
            f"Never-trained baseline: the {base['clients']} schools the original run never drew "
            f"({base['members']} train vs {base['non_members']} held-out rows) score MIA AUC "
            f"{_fmt(base['auc'])} under the original model.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
