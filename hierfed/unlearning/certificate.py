"""The unlearning certificate: ``unlearning.json`` in the new run folder.

It names what was removed, the checkpoint the replay started from (its round and checksum),
the rounds reused and replayed, the new config's fingerprint and file checksum, and the final
state's sha256, so anyone can rerun the new folder's ``config.yaml`` from scratch and compare
checksums. Beside the claim it records the evidence: the loss-based membership-inference AUC
on the removed clients for the original and the unlearned global model, the L2 distance per
component between the two, their final per-task metrics, and the compute measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hierfed.checkpoint import atomic_write_text, load_state, nulled
from hierfed.config import load_config
from hierfed.simulation import _fingerprint, build_federation
from hierfed.unlearning.replay import ReplayResult, original_wall_s
from hierfed.unlearning.verify import file_sha256, l2_per_component, membership_auc

CERTIFICATE = "unlearning.json"


def _final(run_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run_dir / "summary.json").read_text()).get("final", {}))
    except (OSError, ValueError):
        return {}


def certify(res: ReplayResult, original: str | Path, *, mia: bool = True) -> dict[str, Any]:
    """Verify ``res`` (an exact replay of ``original``) and write ``unlearning.json`` into its
    run folder; returns what was written. ``original`` is only read."""
    original = Path(original)
    out = Path(res.cfg.out or ".")
    plan = res.plan
    orig_state, _ = load_state(original / "final_state")
    new_state, _ = load_state(out / "final_state")
    dist = l2_per_component(orig_state, new_state)
    evidence: dict[str, Any] = {
        "l2_distance_original_to_unlearned": dist,
        "l2_distance_total": math.sqrt(sum(v * v for v in dist.values())),
        "final_metrics": {"original": _final(original), "unlearned": _final(out)},
    }
    if mia:
        evidence["membership_inference"] = {
            "attack": "loss threshold (lower loss = member), AUC over all thresholds",
            "members": "the removed clients' training rows",
            "non_members": "the removed clients' held-out test rows",
            "model": "global (final_state)",
            **membership_auc(
                res.cfg,
                build_federation(res.cfg),
                {"original": orig_state, "unlearned": new_state},
                plan.clients,
            ),
        }
    replayed_from: dict[str, Any] = {"round": plan.start_round, "checkpoint": None, "sha256": None}
    if plan.checkpoint is not None:
        replayed_from.update(
            checkpoint=str(plan.checkpoint.relative_to(original)), sha256=res.checkpoint_sha256
        )
    orig_cfg = load_config(original / "config.yaml")
    orig_wall = original_wall_s(original)
    cert = {
        "method": "exact",
        "removed": list(plan.removed),
        "removed_clients": sorted(plan.clients),
        "original_run": {
            "dir": str(original),
            "config_fingerprint": _fingerprint(orig_cfg),
            "final_state_sha256": file_sha256(original / "final_state.safetensors"),
        },
        "first_round_with_their_data": plan.first_round,
        "replayed_from": replayed_from,
        "checkpoints_refused": list(plan.skipped),
        "rounds": {
            "total": plan.rounds,
            "reused": plan.start_round,
            "replayed": plan.rounds_replayed,
        },
        "config": {
            "fingerprint": _fingerprint(res.cfg),
            "config_yaml_sha256": file_sha256(out / "config.yaml"),
            "exclude": list(res.cfg.exclude),
        },
        "final_state_sha256": file_sha256(out / "final_state.safetensors"),
        "compute": {
            "replay_wall_s": res.wall_s,
            "original_run_wall_s": orig_wall,
            "rounds_saved_fraction": plan.start_round / plan.rounds,
        },
        "verification": evidence,
        "check": (
            "python -m hierfed run --config <this folder>/config.yaml --out <new folder>; its "
            "final_state.safetensors must have final_state_sha256 (a run from scratch with "
            "the removed clients excluded; same result on any worker count)"
        ),
    }
    cert = nulled(cert)
    atomic_write_text(out / CERTIFICATE, json.dumps(cert, indent=1, sort_keys=True))
    return cert
