"""A local Ray session listens on loopback only and leaves nothing behind when its driver is
SIGKILLed (issue 13, item 8). Runs a real Ray session in a child process (its own, not the
suite's shared one), so the driver can be killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from hierfed.runtime.reaper import _alive  # noqa: E402  (after the skip)

DRIVER = """
import json, sys, time
import psutil
from hierfed.config import load_config
from hierfed.runtime.ray import RayRuntime
from hierfed.runtime.worker import WorkerSetup
from hierfed.simulation import build_federation
from tests.conftest import tiny_overrides

cfg = load_config(None, tiny_overrides(**{"runtime.num_workers": 1, "runtime.num_cpus": 1}))
rt = RayRuntime(cfg.runtime)
rt.start(WorkerSetup(cfg, build_federation(cfg)))
time.sleep(2)  # let the raylet finish starting its agents
kids = psutil.Process().children(recursive=True)
listen = set()
for p in kids:
    try:
        conns = p.net_connections(kind="inet")
    except psutil.Error:
        continue
    listen |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}
info = {
    "listen": sorted(listen),
    "kids": [[p.pid, p.create_time(), " ".join(p.cmdline())[:80]] for p in kids],
}
open(sys.argv[1], "w").write(json.dumps(info))
print("READY", flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_local_session_is_loopback_only_and_dies_with_a_killed_driver(tmp_path):
    root = Path(__file__).resolve().parent.parent
    script, info_path = tmp_path / "driver.py", tmp_path / "info.json"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(info_path)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        info = json.loads(info_path.read_text())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert info["listen"], "no listening socket seen"
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for ip in info["listen"]), info["listen"]
    names = " ".join(cmd for _, _, cmd in info["kids"])
    assert "DashboardAgent" in names and "RuntimeEnvAgent" in names  # the ones Ray left before
    deadline = time.monotonic() + 30
    left = info["kids"]
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [k for k in info["kids"] if _alive(k[0], k[1])]
    for pid, created, _ in left:  # clean up what this test started before failing
        if _alive(pid, created):
            os.kill(pid, signal.SIGKILL)
    assert not left, [cmd for _, _, cmd in left]
