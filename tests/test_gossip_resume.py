"""A gossip run resumed from a round-1 checkpoint ends bit-identical to the uninterrupted run
(its carried state: node states, local components and the mean model)."""

from __future__ import annotations

import hashlib
import json
import shutil

from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides


def _digest(out):
    state = hashlib.sha256((out / "final_state.safetensors").read_bytes()).hexdigest()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("wall_s", None)
    return state, metrics


def test_gossip_resumes_bit_identically(tmp_path):
    over = {
        "runtime.name": "local",
        "rounds": 3,
        "checkpoint.keep": 3,
        "topology.options.graph": "erdos_renyi",
        "topology.options.time_varying": True,
        "topology.default.dropout": 0.2,
        "model.scopes": '{"prompt.*": local}',
        "topology.options.eval_nodes": 2,
    }
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(**over), topology="gossip", out=str(out))
    run(cfg)
    reference = _digest(out)
    resume_from_round_1(out)
    assert _digest(out) == reference


def resume_from_round_1(out):
    """As if the driver of a finished 3-round run died after round 1 (only that checkpoint
    survives, no outputs), then ``--resume`` with the run folder's own config."""
    ck = out / "checkpoints"
    for name in ("round-0002", "round-0003"):
        shutil.rmtree(ck / name)
    (ck / "LATEST").write_text("round-0001\n")
    for f in ("final_state.safetensors", "metrics.jsonl"):
        (out / f).unlink()
    run(load_config(out / "config.yaml", out=str(out)), resume=True)
