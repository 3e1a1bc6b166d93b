"""The CLI: bad input exits non-zero at once with a clear message; list and show-config work."""

from __future__ import annotations

import subprocess
import sys
import time

from hierfed.cli import main


def test_list_shows_builtin_plugins(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("hierarchical", "star", "weighted_mean", "edu-synth", "fedadam", "sign_flip"):
        assert name in out


def test_show_config_resolves_overrides(capsys):
    assert main(["show-config", "--topology", "star", "rounds=9"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 9" in out and "name: star" in out


def test_bad_values_fail_fast_in_a_fresh_process():
    for args, needle in (
        (["--topology", "hierarchical", "rounds=-1"], "rounds"),
        (["--topology", "nosuch"], "unknown topology 'nosuch'"),
    ):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "hierfed", "run", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        assert needle in proc.stdout
        # fails before Ray or any training starts
        assert "ray" not in proc.stderr.lower()
        assert time.perf_counter() - t0 < 60


def test_report_of_a_missing_folder_is_a_clear_error(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a finished run folder" in capsys.readouterr().out


def test_the_start_line_names_the_tiers_the_topology_runs(tmp_path, capsys):
    small = ["runtime.name=local", "rounds=1", "data.num_institutions=2", "model.d_model=16"]
    small += ["model.num_layers=1", "model.num_heads=2", "eval.personalized=false"]
    for topology, shown, unused in (
        ("star", "tiers global 1, student 12", "institution"),
        ("gossip", "tiers global 1, student 12", "institution"),
        ("hierarchical", "tiers global 1, institution 2, student 12", None),
    ):
        out = str(tmp_path / topology)
        assert main(["run", "--topology", topology, "--out", out, *small]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert shown in text
        assert ("unused" in text) == (unused is not None)
        if unused:
            assert f"the data's {unused} tier unused" in text
