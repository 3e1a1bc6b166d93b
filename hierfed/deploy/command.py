"""``python -m hierfed deploy ...``: a sysadmin's commands for a deployment over Flower.

Every command reads the run's config file (the simulation's, plus its ``deployment`` section)
and turns it into Flower's own command lines, secure by default: TLS on every connection and
SuperNode authentication; ``deployment.insecure=true`` turns TLS off, with a warning.

* ``certs DIR --nodes inst-00 inst-01``: a throwaway CA, SuperLink certificate and node keys
* ``superlink CONFIG``: start the SuperLink (runs ``flower-superlink``)
* ``register CONFIG``: register every institution's public key (``deployment.node_keys``)
* ``supernode CONFIG --institution ID --key KEY``: start one institution's SuperNode
* ``run CONFIG``: launch the run (``flwr run`` of the generated Flower app) and wait for it

``--print`` shows the Flower command instead of running it. docs/deployment.md walks through them.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hierfed.config import DeploymentConfig, RunConfig, load_config, to_yaml
from hierfed.deploy import node_name
from hierfed.errors import ConfigError, HierfedError

log = logging.getLogger(__name__)
CONNECTION = "hierfed"  # the SuperLink connection's name in the flwr CLI's config

APP_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "hierfed-deploy"
version = "1.0.0"
description = "hierfed: the global tier on the SuperLink, one institution per SuperNode"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "hierfed"

[tool.flwr.app.components]
serverapp = "hierfed_app:server"
clientapp = "hierfed_app:client"

[tool.flwr.app.config]
config-yaml = ""
overwrite = false
"""
APP_MODULE = '''"""The Flower app's entry points: hierfed's own (hierfed.deploy.flower_app)."""

from hierfed.deploy.flower_app import client, server

__all__ = ["client", "server"]
'''


def _bin(name: str) -> str:
    """A Flower executable next to this Python, else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def flower_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's processes: this Python's bin folder first on PATH (the
    SuperLink and SuperNode start ``flower-superexec`` from there)."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _file(key: str, value: str) -> str:
    if not value:
        raise ConfigError(
            f"deployment.{key}",
            value,
            "TLS needs it: make trial certificates with `python -m hierfed deploy certs DIR` "
            "and point the deployment section at them, or set deployment.insecure=true "
            "(no encryption; trials only)",
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"deployment.{key}", value, "no such file: check the path")
    return str(path.resolve())


def _warn_insecure(dep: DeploymentConfig) -> bool:
    """Whether TLS is off (then warn, once per command); refuse what Flower would refuse."""
    if dep.insecure and dep.supernode_auth:
        raise ConfigError(
            "deployment.supernode_auth",
            True,
            "SuperNode authentication needs TLS: with deployment.insecure=true also set "
            "deployment.supernode_auth=false (a local trial), or give TLS certificates",
        )
    if dep.insecure and not _WARNED:
        _WARNED.append(True)
        print(
            "WARNING: deployment.insecure=true: no TLS and no SuperNode authentication; "
            "updates cross the network in the clear (local trials only)",
            file=sys.stderr,
        )
    return dep.insecure


_WARNED: list[bool] = []


def preflight(cfg: RunConfig) -> None:
    """Refuse early, in one line, when the SuperLink cannot be reached or does not verify."""
    from hierfed.deploy.preflight import check_superlink

    dep = cfg.deployment
    ca = None if dep.insecure else _file("root_certificates", dep.root_certificates)
    check_superlink(dep.superlink, root_certificates=ca)


def superlink_command(cfg: RunConfig, *, state_db: str | None = None) -> list[str]:
    """``flower-superlink`` for this deployment (one HTTPS port for fleet, control, runtime)."""
    dep = cfg.deployment
    host, _, port = dep.superlink.rpartition(":")
    cmd = [_bin("flower-superlink"), "--disable-runtime-dependency-installation"]
    cmd += ["--host", host or "127.0.0.1", "--port", port]
    if _warn_insecure(dep):
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-certfile", _file("ssl_certfile", dep.ssl_certfile)]
        cmd += ["--ssl-keyfile", _file("ssl_keyfile", dep.ssl_keyfile)]
        cmd += ["--ssl-ca-certfile", _file("root_certificates", dep.root_certificates)]
    if dep.supernode_auth:
        cmd.append("--enable-supernode-auth")
    if state_db:
        cmd += ["--database", state_db]
    return cmd


def supernode_command(
    cfg: RunConfig,
    *,
    institution: str,
    key: str | None,
    workdir: str,
    data: str | None = None,
    port: int = 9094,
    max_wait_s: float | None = None,
) -> list[str]:
    """``flower-supernode`` for one institution (its key pair authenticates it)."""
    dep = cfg.deployment
    cmd = [_bin("flower-supernode"), "--superlink", dep.superlink, "--port", str(port)]
    if _warn_insecure(dep):
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", _file("root_certificates", dep.root_certificates)]
    if dep.supernode_auth:
        if not key:
            raise ConfigError(
                "--key",
                key,
                "deployment.supernode_auth is on: pass this institution's private key "
                "(`python -m hierfed deploy certs` makes trial ones)",
            )
        cmd += ["--auth-supernode-private-key", str(Path(key).expanduser().resolve())]
    node = {"institution": institution, "workdir": str(Path(workdir).expanduser().resolve())}
    if data:
        node["data"] = str(Path(data).expanduser().resolve())
    cmd += ["--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in node.items())]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    return cmd


def flwr_home(cfg: RunConfig) -> Path:
    """A Flower CLI home holding one connection, ``hierfed``, to this deployment's SuperLink
    (``$FLWR_HOME`` when set, else ``~/.hierfed/flwr``)."""
    import tomli_w

    home = Path(os.environ.get("FLWR_HOME") or "~/.hierfed/flwr").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    dep = cfg.deployment
    conn: dict[str, Any] = {"address": dep.superlink}
    if _warn_insecure(dep):
        conn["insecure"] = True
    else:
        conn["root-certificates"] = _file("root_certificates", dep.root_certificates)
    text = tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}})
    (home / "config.toml").write_text(text)
    return home


def _flwr_env(cfg: RunConfig) -> dict[str, str]:
    return {**flower_env(), "FLWR_HOME": str(flwr_home(cfg))}


def register_commands(cfg: RunConfig) -> list[list[str]]:
    """One ``flwr supernode register`` per institution key in ``deployment.node_keys``."""
    keys = cfg.deployment.node_keys
    if cfg.deployment.supernode_auth and not keys:
        raise ConfigError(
            "deployment.node_keys",
            {},
            "SuperNode authentication is on: list each institution's public key, e.g. "
            "node_keys: {global/inst-00: certs/inst-00.pub}",
        )
    out = []
    for inst, pub in sorted(keys.items()):
        path = Path(pub).expanduser()
        if not path.is_file():
            raise ConfigError(f"deployment.node_keys.{inst}", pub, "no such public key file")
        name = node_name(inst)
        out.append(
            [_bin("flwr"), "supernode", "register", str(path.resolve()), CONNECTION, "--name", name]
        )
    return out


def write_app(folder: Path) -> Path:
    """The Flower app (pyproject + entry module) that ``flwr run`` ships to the SuperLink."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    (folder / "hierfed_app.py").write_text(APP_MODULE)
    return folder


def run_command(cfg: RunConfig, app: Path, run_config: Path) -> list[str]:
    return [_bin("flwr"), "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]


def launch(cfg: RunConfig, *, overwrite: bool = False, timeout_s: float | None = None) -> int:
    """Launch the run on the SuperLink and wait for it; 0 when the run folder says it ended."""
    import tomli_w

    if not cfg.out:
        raise ConfigError("--out", None, "a deployed run needs its run folder (on the server)")
    cfg.out = str(Path(cfg.out).expanduser().resolve())
    preflight(cfg)
    env = _flwr_env(cfg)
    with tempfile.TemporaryDirectory(prefix="hierfed-app-") as tmp:
        app = write_app(Path(tmp) / "app")
        rc_file = Path(tmp) / "run-config.toml"
        rc_file.write_text(tomli_w.dumps({"config-yaml": to_yaml(cfg), "overwrite": overwrite}))
        proc = subprocess.run(run_command(cfg, app, rc_file), env=env, timeout=timeout_s)
    status = Path(cfg.out) / "deployment.json"
    if not status.exists():
        return proc.returncode or 1
    info = json.loads(status.read_text())
    if info.get("error"):
        print(f"deployed run failed: {info['error']}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub: Any) -> None:
    """Register ``deploy`` and its subcommands on the CLI's subparsers."""
    d = sub.add_parser("deploy", help="run the global tier over Flower (docs/deployment.md)")
    ds = d.add_subparsers(dest="deploy_cmd", required=True)
    c = ds.add_parser("certs", help="make a throwaway CA, SuperLink certificate and node keys")
    c.add_argument("folder")
    c.add_argument("--nodes", nargs="+", required=True, help="node names, e.g. inst-00 inst-01")
    c.add_argument("--host", action="append", default=[], help="extra SuperLink host name/IP")
    for name, text in (
        ("superlink", "start the SuperLink"),
        ("register", "register the institutions' public keys at the SuperLink"),
        ("supernode", "start one institution's SuperNode"),
        ("run", "launch the run and wait for it"),
    ):
        p = ds.add_parser(name, help=text)
        p.add_argument("config", help="the run's YAML config (with a deployment section)")
        p.add_argument("--print", action="store_true", help="print the command, run nothing")
        if name == "supernode":
            p.add_argument("--institution", required=True, help="e.g. global/inst-00")
            p.add_argument("--key", default=None, help="this SuperNode's private key")
            p.add_argument("--workdir", default="~/.hierfed/supernode")
            p.add_argument("--data", default=None, help="YAML whose data section is this node's")
            p.add_argument("--port", type=int, default=9094, help="its local runtime API port")
        if name == "run":
            p.add_argument("--out", default=None, help="run folder on the server")
            p.add_argument("--overwrite", action="store_true")
        p.add_argument("overrides", nargs="*", help="key=value config overrides")


def main(args: Any) -> int:
    if args.deploy_cmd == "certs":
        from hierfed.deploy.certs import make_credentials

        creds = make_credentials(args.folder, nodes=args.nodes, hosts=args.host)
        print(f"CA {creds.ca_cert}; SuperLink {creds.server_cert} / {creds.server_key}")
        for n, (priv, pub) in creds.node_keys.items():
            print(f"{n}: private {priv}, public {pub}")
        return 0
    cfg = load_config(args.config, args.overrides, out=getattr(args, "out", None))
    if args.deploy_cmd == "superlink":
        cmds = [superlink_command(cfg)]
    elif args.deploy_cmd == "register":
        cmds = register_commands(cfg)
    elif args.deploy_cmd == "supernode":
        cmds = [
            supernode_command(
                cfg,
                institution=args.institution,
                key=args.key,
                workdir=args.workdir,
                data=args.data,
                port=args.port,
            )
        ]
    else:
        if args.print:
            print(shlex.join(run_command(cfg, Path("APP"), Path("RUN_CONFIG.toml"))))
            return 0
        return launch(cfg, overwrite=args.overwrite)
    if args.print:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if args.deploy_cmd in ("register", "supernode"):
        preflight(cfg)
    if args.deploy_cmd != "register":  # Flower itself takes this process over (and its signals)
        os.execvpe(cmds[0][0], cmds[0], flower_env())
    env = _flwr_env(cfg)
    for cmd in cmds:
        rc = subprocess.call(cmd, env=env)
        if rc:
            raise HierfedError(f"`{shlex.join(cmd[:3])} ...` exited with {rc}")
    return 0
