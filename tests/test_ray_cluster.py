"""A real two-node Ray cluster on this machine (issue 14, item 3): ``ray start --head`` and a
second ``ray start --address=...`` with its own resources, each a process group of this test's
own (own temp dir, own ports, no dashboard, a small object store), so the Ray sessions of
anything else on the machine are neither joined nor stopped. The default hierarchical job
(the tests' small sizes) runs against it through ``runtime.address`` in a child process (the
suite's driver is already attached to its own Ray session, and a driver joins one cluster);
its workers must land on both nodes, and its final state must equal the local runtime's, bit
for bit. (The GPU refusals are tested on the suite's session: tests/test_gpu_workers.py.)

``ray stop`` is never used: it ends every Ray session on the machine. Teardown kills the two
process groups this test started, and every process they spawned, by pid."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hierfed.checkpoint import load_state
from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parent.parent
# the ray CLI of the interpreter running the tests, else the one on PATH
RAY_CLI = next(
    (
        str(p)
        for p in (Path(sys.executable).parent / "ray", shutil.which("ray"))
        if p and Path(p).is_file()
    ),
    None,
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(RAY_CLI is None, reason="the `ray` command line is not installed"),
]

STARTED = "Ray runtime started."


def _free_ports(k: int) -> list[int]:
    socks = []
    try:
        for _ in range(k):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HIERFED_LOG": "INFO"}
    env.pop("RAY_ADDRESS", None)  # join exactly the cluster named, nothing else
    # a local hierfed session sets this to 0 (loopback only), which Ray reads as "no
    # multi-node clusters": a cluster needs it on (docs/cluster.md)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
    # Ray runs its workers at nice 15 unless told otherwise; on a machine shared with other
    # work that starves them (hierfed sets the same for the sessions it starts itself)
    env.setdefault("RAY_worker_niceness", "0")
    return env


def _node_args(temp_dir: Path) -> list[str]:
    """Ports and directories of one node: every port its own, workers on random ports."""
    dash, agent_http, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = _free_ports(7)
    return [
        "--num-cpus=1",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=78643200",  # 75 MiB, Ray's minimum
        "--disable-usage-stats",
        "--include-log-monitor=false",  # streams worker logs to drivers: none are wanted
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        "--block",
    ] + ([f"--dashboard-port={dash}"] if "head" in temp_dir.name else [])


def _start_node(args: list[str], log: Path, procs: list) -> subprocess.Popen:
    """``ray start ... --block`` in a process group of its own (not waited for)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [RAY_CLI, "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,  # its own group: killed as a whole, and only it
        )
    procs.append(proc)
    return proc


def _wait(proc: subprocess.Popen, log: Path, ready) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ray start failed:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def _kill_all(procs: list) -> None:
    """SIGKILL each node's process group and every process it spawned (by pid and start
    time, so a reused pid is never hit), then wait until they are gone."""
    tree = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            tree += [root, *root.children(recursive=True)]
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil checks the start time: a recycled pid is left alone
    _, alive = psutil.wait_procs(tree, timeout=10)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    assert not alive, [p.pid for p in alive]


@pytest.fixture
def two_node_cluster() -> Iterator[tuple[str, Path]]:
    """(head address, head's temp dir) of a cluster: head with 1 CPU, a second node with 1 CPU
    and a custom resource ``node2``."""
    # Ray's socket paths live under the temp dir and must stay short (108 bytes on Linux)
    tmp = Path(tempfile.mkdtemp(prefix="hfc", dir="/tmp"))
    procs: list = []
    try:
        gcs, client = _free_ports(2)
        head = tmp / "head"
        head_args = ["--head", f"--port={gcs}", f"--ray-client-server-port={client}"]
        first = _start_node(
            [*head_args, "--include-dashboard=false", *_node_args(head)], tmp / "head.log", procs
        )
        # the second node needs only the head's GCS, not the rest of the head
        _wait(first, tmp / "head.log", lambda: _accepts(gcs))
        address = f"127.0.0.1:{gcs}"
        node2 = ['--resources={"node2": 1}', *_node_args(tmp / "node2")]
        second = _start_node([f"--address={address}", *node2], tmp / "node2.log", procs)
        for proc, log in ((first, tmp / "head.log"), (second, tmp / "node2.log")):
            # printed once the node's raylet has registered with the GCS
            _wait(proc, log, lambda log=log: STARTED in log.read_text())
        yield address, head
    finally:
        _kill_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def _hierfed(*args: str) -> subprocess.Popen:
    """``python -m hierfed run ARGS`` in a child process (its output read by ``_finish``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "hierfed", "run", *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_the_default_job_on_a_two_node_cluster_equals_the_local_run(two_node_cluster, tmp_path):
    address, head = two_node_cluster
    overrides = tiny_overrides()
    # the local reference runs here meanwhile (the cluster's workers leave this process idle)
    job = _hierfed(
        "--out",
        str(tmp_path / "cluster"),
        *overrides,
        f"runtime.address={address}",
        "runtime.num_workers=2",  # 1 CPU each on nodes of 1 CPU: one must run on node 2
    )
    try:
        run(load_config(None, [*overrides, "runtime.name=local"], out=str(tmp_path / "local")))
    finally:
        rc, _, err = _finish(job)
    assert rc == 0, err[-3000:]

    # the nodes the cluster registered (the head's GCS log) are the nodes the workers ran on
    gcs_log = next(head.glob("session_*/logs/gcs_server.out")).read_text()
    nodes = set(re.findall(r"Registering new node\. node_id=([0-9a-f]+)", gcs_log))
    assert len(nodes) == 2, gcs_log[-2000:]
    pool = re.search(r"worker pool: 2 workers on 2 nodes \((.*)\)", err)
    assert pool, err[-3000:]
    placed = dict(re.findall(r"node ([0-9a-f]+): (\d+)", pool.group(1)))
    assert placed == {n: "1" for n in nodes}

    # the same final state as the local runtime's, bit for bit
    ours, _ = load_state(tmp_path / "cluster" / "final_state")
    ref, _ = load_state(tmp_path / "local" / "final_state")
    assert set(ours) == set(ref) and ref
    for c in ref:
        assert set(ours[c]) == set(ref[c])
        for p in ref[c]:
            assert torch.equal(ours[c][p], ref[c][p]), f"{c}/{p}"
    digest = [(tmp_path / d / "final_state.json").read_text() for d in ("cluster", "local")]
    assert digest[0] == digest[1]  # the run folders' digests (sha256 of body and tensors)
