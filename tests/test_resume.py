"""Kill the driver with SIGKILL at several points, resume, and end bit-identical to an
uninterrupted run; corrupted and truncated checkpoints are refused."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hierfed.config import load_config
from hierfed.errors import CheckpointError
from hierfed.simulation import run
from tests.conftest import tiny_overrides

OVERRIDES = tiny_overrides(
    **{
        "runtime.name": "local",
        "rounds": 3,
        "eval.personalized": "true",
        "topology.tiers.institution.participation": 0.67,
        "topology.tiers.global.server_optimizer": "fedadam",
        "topology.tiers.global.server_lr": 0.05,
    }
)


def _digest(run_dir: Path) -> tuple[str, list[dict]]:
    state = hashlib.sha256((run_dir / "final_state.safetensors").read_bytes()).hexdigest()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("wall_s", None)
    return state, metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run(load_config(None, OVERRIDES, out=str(out)))
    return _digest(out)


@pytest.mark.parametrize("kill_at", ["after-round:1", "in-checkpoint:2", "before-latest:2"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, reference, kill_at):
    out = tmp_path / "run"
    env = {**os.environ, "HIERFED_FAULT": kill_at}
    proc = subprocess.run(
        [sys.executable, "-m", "hierfed", "run", "--quiet", "--out", str(out), *OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert not (out / "final_state.safetensors").exists()
    # resume in-process, from the folder's own config
    cfg = load_config(out / "config.yaml", out=str(out))
    run(cfg, resume=True)
    state, metrics = _digest(out)
    assert state == reference[0]
    assert metrics == reference[1]


def test_resume_cli_continues_a_finished_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    cfg = load_config(None, OVERRIDES, out=str(out))
    run(cfg)
    from hierfed.cli import main

    assert (
        main(["run", "--resume", str(out), "--quiet"]) == 0
    )  # nothing left to run: outputs rewritten
    assert _digest(out)[0] == reference[0]


def _one_checkpoint(tmp_path) -> Path:
    out = tmp_path / "run"
    run(load_config(None, tiny_overrides(**{"runtime.name": "local", "rounds": 1}), out=str(out)))
    return out


def test_truncated_checkpoint_is_refused(tmp_path):
    out = _one_checkpoint(tmp_path)
    tensor = out / "checkpoints" / "round-0001" / "state.safetensors"
    tensor.write_bytes(tensor.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        run(load_config(out / "config.yaml", out=str(out)), resume=True)


def test_corrupted_checkpoint_is_refused(tmp_path):
    out = _one_checkpoint(tmp_path)
    tensor = out / "checkpoints" / "round-0001" / "state.safetensors"
    data = bytearray(tensor.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensor.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        run(load_config(out / "config.yaml", out=str(out)), resume=True)
    (out / "checkpoints" / "round-0001" / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="metadata"):
        run(load_config(out / "config.yaml", out=str(out)), resume=True)


def test_resume_without_checkpoint_or_with_another_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        run(
            load_config(
                None, tiny_overrides(**{"runtime.name": "local"}), out=str(tmp_path / "empty")
            ),
            resume=True,
        )
    out = _one_checkpoint(tmp_path)
    other = load_config(out / "config.yaml", ["train.lr=0.5"], out=str(out))
    with pytest.raises(CheckpointError, match="another config"):
        run(other, resume=True)
