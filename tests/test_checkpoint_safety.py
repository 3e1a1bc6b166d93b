"""Checkpoints are data, never code (issue 13, items 1 and 9).

An edited checkpoint cannot make the loader import or call anything, an edit anywhere in what
the loader reads is refused, LATEST cannot point outside the run folder, the fingerprint is
checked before anything is built, and a checkpoint holds only what changed (the metrics and
ledger histories go to append-only logs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hierfed.checkpoint import (
    _digest,
    load_bundle,
    pack,
    save_state_flat,
    unpack,
)
from hierfed.config import load_config
from hierfed.errors import CheckpointError
from hierfed.privacy.accountant import PrivacyState
from hierfed.resume import read_latest
from hierfed.simulation import run
from tests.conftest import tiny_overrides


def _rewrite_body(json_path: Path, edit, *, fix_checksum: bool) -> None:
    """Edit a checkpoint's JSON body; optionally recompute the checksum as an attacker would."""
    env = json.loads(json_path.read_text())
    body = json.loads(env["body"])
    edit(body)
    env["body"] = json.dumps(body, sort_keys=True)
    if fix_checksum:
        data = json_path.with_suffix(".safetensors").read_bytes()
        env["sha256"] = _digest(env["body"].encode(), data)
    json_path.write_text(json.dumps(env))


def test_a_checkpoint_naming_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    tree = {
        "__d__": {
            "x": {"__dc__": "hierfed.resume:os.system", "fields": {"command": f"touch {marker}"}}
        }
    }
    # even with a correct checksum (anyone who can write the file can compute one)
    save_state_flat(tmp_path / "state", {}, {"tree": tree})
    with pytest.raises(CheckpointError, match="not an allowed checkpoint type"):
        load_bundle(tmp_path, "state")
    assert not marker.exists()


def test_only_registered_dataclasses_round_trip():
    s = PrivacyState.empty("p", 1e-5, 8.0)
    tensors: dict = {}
    assert unpack(json.loads(json.dumps(pack({"c": s}, tensors))), tensors) == {"c": s}

    @dataclass(frozen=True)
    class Mine:
        a: int

    with pytest.raises(CheckpointError, match="not a registered checkpoint type"):
        pack(Mine(1), {})
    # a registered type with an extra field (a keyword the class would have to swallow)
    bad = {"__dc__": "hierfed.privacy.accountant:PrivacyState", "fields": {"policy": "p", "x": 1}}
    with pytest.raises(CheckpointError, match="has fields"):
        unpack(bad, {})
    with pytest.raises(CheckpointError, match="missing tensor"):
        unpack({"__t__": "nope"}, {})
    with pytest.raises(CheckpointError, match="unrecognised"):
        unpack({"__t__": "a", "__dc__": "b"}, {"a": torch.ones(1)})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    over = tiny_overrides(**{"runtime.name": "local", "rounds": 3, "checkpoint.keep": 3})
    run(load_config(None, over, out=str(out)))
    return out


def _copy(finished, tmp_path) -> Path:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def test_an_edited_round_is_refused_with_or_without_a_fixed_checksum(finished, tmp_path):
    out = _copy(finished, tmp_path)
    state = out / "checkpoints" / "round-0003" / "state.json"

    def minus_five(body):
        body["tree"]["__d__"]["round"] = -5

    _rewrite_body(state, minus_five, fix_checksum=False)
    cfg = load_config(out / "config.yaml", out=str(out))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_latest(out)
    _rewrite_body(state, lambda b: None, fix_checksum=True)  # now consistent again
    with pytest.raises(CheckpointError, match="gives round -5; expected 3"):
        run(cfg, resume=True)


def test_an_edited_number_in_the_json_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    state = out / "checkpoints" / "round-0003" / "state.json"

    def clock(body):
        body["tree"]["__d__"]["sim_total"] = 1.0

    _rewrite_body(state, clock, fix_checksum=False)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_latest(out)


def test_the_fingerprint_is_checked_before_anything_is_built(finished, tmp_path):
    out = _copy(finished, tmp_path)
    state = out / "checkpoints" / "round-0003" / "state.json"

    def poison(body):
        body["tree"]["__d__"]["topology"] = {"__dc__": "hierfed.resume:os.system", "fields": {}}

    _rewrite_body(state, poison, fix_checksum=True)
    with pytest.raises(CheckpointError, match="another config"):
        read_latest(out, fingerprint="0" * 16)
    with pytest.raises(CheckpointError, match="not an allowed checkpoint type"):
        read_latest(out)


@pytest.mark.parametrize("name", ["../../..", "round-0003/../../x", "/etc", "round-x", ""])
def test_latest_cannot_point_outside_the_run_folder(finished, tmp_path, name):
    out = _copy(finished, tmp_path)
    (out / "checkpoints" / "LATEST").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_latest(out)


def test_latest_may_not_be_a_symlink_to_elsewhere(finished, tmp_path):
    out = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (out / "checkpoints" / "round-0003").rename(elsewhere)
    (out / "checkpoints" / "round-0003").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        read_latest(out)


def test_a_round_beyond_the_run_is_refused(finished, tmp_path):
    out = _copy(finished, tmp_path)
    with pytest.raises(CheckpointError, match="rounds=2"):
        read_latest(out, rounds=2)


def test_checkpoints_hold_only_what_changed(finished):
    """The state files of round 1 and round 3 are the same size (the carried state has a
    fixed shape); the histories grow in the append-only logs, one record per line."""
    ck = finished / "checkpoints"
    size = {
        r: sum(
            (ck / f"round-000{r}" / f).stat().st_size for f in ("state.json", "state.safetensors")
        )
        for r in (1, 2, 3)
    }
    # a few bytes of digits (clock, log lengths, hashes are fixed-size) may differ
    assert abs(size[3] - size[1]) < 64, size
    metrics = (ck / "metrics.log").read_text().splitlines()
    assert len(metrics) == 4  # round 0 and three rounds
    body = json.loads(json.loads((ck / "round-0003" / "state.json").read_text())["body"])
    assert "metrics" not in body["tree"]["__d__"] and "ledger" not in body["tree"]["__d__"]
    ledger_lines = (ck / "ledger.log").read_text().splitlines()
    csv_rows = (finished / "ledger.csv").read_text().splitlines()[1:]
    assert len(ledger_lines) == len(csv_rows) > 0


def test_a_tampered_log_is_refused_and_a_crashed_tail_is_cut(finished, tmp_path):
    out = _copy(finished, tmp_path)
    log = out / "checkpoints" / "metrics.log"
    good = log.read_bytes()
    log.write_bytes(good + b'{"half a round": ')  # what a crash mid-append leaves
    back = read_latest(out)
    assert len(back["metrics"]) == 4 and log.read_bytes() == good
    log.write_bytes(good.replace(b'"round"', b'"rounX"', 1))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_latest(out)
