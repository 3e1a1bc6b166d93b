"""Run folders are locked while in use and never silently overwritten (issue 13, item 5)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from hierfed.cli import main
from hierfed.config import load_config
from hierfed.errors import ConfigError
from hierfed.rundir import RunDirBusy, claim_run_dir, unique_default
from hierfed.simulation import run
from tests.conftest import tiny_overrides

LOCAL = {"runtime.name": "local", "rounds": 1}


def test_a_held_folder_is_refused_to_a_second_run(tmp_path):
    out = tmp_path / "run"
    with claim_run_dir(out, resume=False, overwrite=False):
        with pytest.raises(RunDirBusy, match="in use by another run"):
            claim_run_dir(out, resume=False, overwrite=True)
        cfg = load_config(None, tiny_overrides(**LOCAL), out=str(out))
        with pytest.raises(RunDirBusy):
            run(cfg, overwrite=True)
    # released; the run wrote nothing, so the folder it made is gone again
    assert not out.exists()
    claim_run_dir(out, resume=False, overwrite=False).release()


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys, time; from hierfed.rundir import claim_run_dir; "
        f"claim_run_dir({str(out)!r}, resume=False, overwrite=False); print('held', flush=True); "
        "time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
            claim_run_dir(out, resume=True, overwrite=False)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    claim_run_dir(out, resume=True, overwrite=False).release()  # the kernel dropped it


def test_a_finished_run_folder_is_not_overwritten_without_asking(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out), *tiny_overrides(**LOCAL)]
    assert main(args) == 0
    before = (out / "final_state.safetensors").read_bytes()
    assert main(args) == 2
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("error: config key '--out'") and "--overwrite" in line
    assert (out / "final_state.safetensors").read_bytes() == before  # untouched
    # --overwrite replaces the whole run: no stale checkpoint beside a new LATEST
    assert main([*args[:4], "--overwrite", *tiny_overrides(**{**LOCAL, "checkpoint.keep": 1})]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "LATEST",
        "ledger.log",
        "metrics.log",
        "round-0001",
    ]


def test_overwrite_removes_only_a_runs_own_files(tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(ConfigError, match="'thesis.tex', which a run did not write"):
        claim_run_dir(out, resume=False, overwrite=True)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_a_bad_out_fails_before_anything_starts(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hierfed", "run", "--quiet", "--out", str(blocker / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.startswith("error: config key '--out'") and "Traceback" not in proc.stderr
    # nothing started: no Ray (the default runtime) and no model
    assert "starting the ray runtime" not in proc.stdout and "ray" not in proc.stderr.lower()
    assert time.perf_counter() - t0 < 60


def test_resume_and_overwrite_exclude_each_other_and_default_folders_never_collide(tmp_path):
    with pytest.raises(ConfigError, match="cannot be combined with --resume"):
        claim_run_dir(tmp_path, resume=True, overwrite=True)
    first = tmp_path / "20260101-000000-star"
    first.mkdir()
    assert unique_default(first).name == "20260101-000000-star-2"
