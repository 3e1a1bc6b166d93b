"""A whole deployment on one machine, for tests and benchmarks: trial credentials, a
SuperLink, registered keys and one SuperNode per institution, each Flower process in its own
process group (stopped by that group, never by name).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

from hierfed.config import RunConfig, load_config
from hierfed.deploy import command
from hierfed.deploy.certs import Credentials, make_credentials
from hierfed.deploy.preflight import SuperLinkUnreachable, check_superlink


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Localhost:
    """Start with ``up(institutions)``; ``stop(name)`` or ``down()`` end what it started."""

    def __init__(self, root: Path, cfg: RunConfig, *, pythonpath: str = "") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self.env = {
            **command.flower_env(),
            "FLWR_HOME": str(self.root / "flwr"),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start each ClientApp sooner
        }
        if pythonpath:
            self.env["PYTHONPATH"] = os.pathsep.join([pythonpath, self.env.get("PYTHONPATH", "")])
        self.creds: Credentials | None = None
        self.cfg = cfg

    @classmethod
    def from_yaml(cls, root: Path, yaml_text: str, nodes: list[str], **kw: str) -> Localhost:
        """Make trial credentials in ``root/creds`` and a config from ``yaml_text`` (its
        ``deployment`` section is filled in: a free port, the credentials, the node keys)."""
        root = Path(root)
        creds = make_credentials(root / "creds", nodes=nodes)
        (root / "cfg.yaml").write_text(yaml_text)
        cfg = load_config(root / "cfg.yaml")
        dep = replace(
            cfg.deployment,
            superlink=f"127.0.0.1:{free_port()}",
            root_certificates=str(creds.ca_cert),
            ssl_certfile=str(creds.server_cert),
            ssl_keyfile=str(creds.server_key),
            node_keys={f"global/{n}": str(creds.node_keys[n][1]) for n in nodes if "inst" in n},
        )
        site = cls(root, replace(cfg, deployment=dep), **kw)
        site.creds = creds
        return site

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115  (closed in stop)
        self._logs[name] = log
        p = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def up(self, institutions: list[str], *, timeout_s: float = 60.0) -> None:
        """SuperLink, key registration, one SuperNode per institution (``global/inst-00``)."""
        assert self.creds is not None
        cfg = self.cfg
        self.start("superlink", command.superlink_command(cfg))
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                check_superlink(cfg.deployment.superlink, root_certificates=str(self.creds.ca_cert))
                break
            except SuperLinkUnreachable:
                if self.procs["superlink"].poll() is not None or time.monotonic() > deadline:
                    why = "the SuperLink did not start:\n" + self.log("superlink")
                    raise RuntimeError(why) from None
                time.sleep(0.3)
        old = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]
        try:
            command.flwr_home(cfg)
        finally:
            if old is None:
                os.environ.pop("FLWR_HOME")
            else:
                os.environ["FLWR_HOME"] = old
        for cmd in command.register_commands(cfg):
            out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
            if out.returncode:
                raise RuntimeError(f"{cmd}: {out.stdout}{out.stderr}")
        for inst in institutions:
            self.supernode(inst.split("/")[-1], inst)

    def supernode(self, key_name: str, institution: str, *extra: str) -> subprocess.Popen:
        assert self.creds is not None
        cmd = command.supernode_command(
            self.cfg,
            institution=institution,
            key=str(self.creds.node_keys[key_name][0]),
            workdir=str(self.root / "nodes"),
            port=free_port(),
        )
        return self.start(key_name, [*cmd, *extra])

    def launch(self, cfg: RunConfig, *, timeout_s: float = 900) -> int:
        """``hierfed deploy run`` against this SuperLink (with this site's ``FLWR_HOME``)."""
        old = {k: os.environ.get(k) for k in ("FLWR_HOME", "PYTHONPATH")}
        os.environ["FLWR_HOME"] = self.env["FLWR_HOME"]
        if "PYTHONPATH" in self.env:
            os.environ["PYTHONPATH"] = self.env["PYTHONPATH"]
        try:
            return command.launch(cfg, timeout_s=timeout_s)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the group we started: it and its children
                p.wait(2)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
            except ProcessLookupError:
                pass
        self._logs.pop(name).close()

    def down(self, grace_s: float = 2.0) -> None:
        """End every process group this site started: SIGTERM to all, then SIGKILL to what
        is still running after ``grace_s`` (all waited for together)."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.procs.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for name in list(self.procs):
            self.stop(name)  # SIGKILLs a group that is still there
