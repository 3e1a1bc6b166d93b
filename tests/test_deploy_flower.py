"""A real deployment on localhost: a ``flower-superlink`` and one ``flower-supernode`` per
institution, with TLS and SuperNode authentication, run the default hierarchical job and end
where the simulation ends; an unregistered SuperNode is refused.

One SuperLink and its SuperNodes serve the whole module (their start-up is the cost). The
heavier drills (a SuperNode killed mid-run, a SuperNode with other data, SecAgg+) run with
``HIERFED_DEPLOY_FULL=1``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from hierfed.checkpoint import load_state
from hierfed.config import load_config
from hierfed.ledger import CommLedger
from hierfed.simulation import run

FLOWER = Path(sys.executable).parent / "flower-superlink"
pytestmark = pytest.mark.skipif(not FLOWER.exists(), reason="flower-superlink not installed")
FULL = os.environ.get("HIERFED_DEPLOY_FULL") == "1"
REPO = Path(__file__).resolve().parents[1]
INSTS = ["global/inst-00", "global/inst-01"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = """rounds: 2
data: {{num_institutions: 2, students_per_institution: 3, samples_per_student: 24,
       global_test_size: 90, essay_only_institutions: 1}}
model: {{d_model: 16, num_layers: 1, num_heads: 2, prompt_tokens: 2}}
train: {{batch_size: 16}}
eval: {{personalized: false, equity: false}}
runtime: {{name: local}}
deployment:
  superlink: 127.0.0.1:{port}
  root_certificates: {creds}/ca.crt
  ssl_certfile: {creds}/server.pem
  ssl_keyfile: {creds}/server.key
  node_keys: {{global/inst-00: {creds}/inst-00.pub, global/inst-01: {creds}/inst-01.pub}}
  connect_timeout_s: 60
  round_timeout_s: 90
"""


class Site:
    """The processes this module started (each in its own process group) and their logs."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}
        from hierfed.deploy.command import flower_env

        self.env = {
            **flower_env(),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "FLWR_HOME": str(root / "flwr"),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start each ClientApp sooner
        }

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115  (closed with the process)
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)  # the group we started: the node and its children
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from hierfed.deploy import command
    from hierfed.deploy.certs import make_credentials
    from hierfed.deploy.preflight import SuperLinkUnreachable, check_superlink

    root = tmp_path_factory.mktemp("deploy")
    creds = make_credentials(root / "creds", nodes=["inst-00", "inst-01", "rogue"])
    port = _free_port()
    (root / "cfg.yaml").write_text(CONFIG.format(port=port, creds=creds.folder))
    cfg = load_config(root / "cfg.yaml")
    s = Site(root)
    old_home = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = s.env["FLWR_HOME"]
    try:
        s.start("superlink", command.superlink_command(cfg))
        deadline = time.monotonic() + 60
        while True:
            try:
                check_superlink(cfg.deployment.superlink, root_certificates=str(creds.ca_cert))
                break
            except SuperLinkUnreachable:
                assert s.procs["superlink"].poll() is None, s.log("superlink")
                assert time.monotonic() < deadline, s.log("superlink")
                time.sleep(0.5)
        command.flwr_home(cfg)
        for cmd in command.register_commands(cfg):
            out = subprocess.run(cmd, env=s.env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
        for inst in INSTS:
            name = inst.split("/")[1]
            s.start(
                name,
                command.supernode_command(
                    cfg,
                    institution=inst,
                    key=str(creds.node_keys[name][0]),
                    workdir=str(root / "nodes"),
                    port=_free_port(),
                ),
            )
        # a SuperNode whose key nobody registered: refused at the door
        rogue = command.supernode_command(
            cfg,
            institution=INSTS[0],
            key=str(creds.node_keys["rogue"][0]),
            workdir=str(root / "rogue"),
            port=_free_port(),
        )
        s.start("rogue", [*rogue, "--max-retries", "1"])
        s.cfg = cfg
        yield s
    finally:
        for name in list(s.procs):
            s.stop(name)
        if old_home is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = old_home


def _launch(site: Site, out: Path, **over) -> int:
    from dataclasses import replace

    from hierfed.deploy.command import launch

    cfg = replace(site.cfg, out=str(out), **over)
    return launch(cfg, timeout_s=400)


def test_deployed_run_equals_the_simulated_run(site, tmp_path):
    out = tmp_path / "deployed"
    rc = _launch(site, out)
    assert rc == 0, site.log("superlink")[-3000:]
    sim = run(load_config(site.root / "cfg.yaml", out=str(tmp_path / "sim")))
    state, _ = load_state(out / "final_state")
    assert state.keys() == sim.final_state.keys()
    for c, params in sim.final_state.items():
        for p, t in params.items():
            assert torch.allclose(state[c][p], t, rtol=0, atol=1e-6), f"{c}/{p}"
    top = CommLedger.load(out / "ledger.csv").by_edge()
    assert top == {e: n for e, n in sim.ledger.by_edge().items() if "global" in e}
    info = (out / "deployment.json").read_text()
    assert '"error": null' in info and '"institution->student"' in info
    # raw data and student updates stayed at the SuperNodes: their ledgers hold the inner edges
    assert list((site.root / "nodes" / "global_inst-00").glob("run-*/ledger.csv"))


def test_an_unregistered_supernode_is_refused(site):
    p = site.procs["rogue"]
    p.wait(60)
    assert p.returncode != 0
    assert "Failed to activate SuperNode" in site.log("rogue")


@pytest.mark.skipif(not FULL, reason="set HIERFED_DEPLOY_FULL=1 (a SuperNode is killed: last)")
def test_a_supernode_killed_mid_run_follows_the_quorum(site, tmp_path):
    from dataclasses import replace

    out = tmp_path / "killed"
    tiers = dict(site.cfg.topology.tiers)
    tiers["global"] = replace(site.cfg.topology.default, quorum=0.5)
    over = {
        "rounds": 3,
        "runtime": replace(site.cfg.runtime, on_client_failure="drop"),
        "topology": replace(site.cfg.topology, tiers=tiers),
        "deployment": replace(site.cfg.deployment, round_timeout_s=45.0),
    }
    result: dict[str, int] = {}
    th = threading.Thread(target=lambda: result.update(rc=_launch(site, out, **over)))
    th.start()
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "round-0001").exists():
        assert time.monotonic() < deadline and th.is_alive()
        time.sleep(0.5)
    site.stop("inst-01")
    th.join(400)
    assert result.get("rc") == 0, site.log("superlink")[-3000:]
    import json

    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["round"] == 3
    assert [m["failed"] for m in metrics[1:]][-1] == 1  # inst-01 gone, the quorum of 0.5 met
