"""The Flower app of a deployment: a ServerApp for the global tier, a ClientApp per institution.

``server`` runs on the SuperLink (``flwr run``, see ``hierfed.deploy.command``): it finds the
SuperNode of every institution, then runs ``hierfed.deploy.server.run_server`` with a dispatch
that sends each institution the root's broadcast and waits for its reply over Flower's
transport. ``client`` runs on each SuperNode: ``institution`` (its node id in the tree, e.g.
``global/inst-00``), ``workdir`` (where it keeps its state) and, optionally, ``data`` (a YAML
file whose ``data`` section describes its own data) come from ``--node-config``.

Messages: ``query`` (which institution are you?) and ``train`` (one round of your subtree).
A ``train`` reply carries one pre-weighted Update — or, under SecAgg+ (``deployment.secagg``),
that Update masked (``hierfed.deploy.secagg``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from hierfed.config import RunConfig, load_config, to_yaml
from hierfed.deploy import node_name
from hierfed.deploy.node import InstitutionSite, SiteMismatch, institution_profile
from hierfed.deploy.secagg import check_secagg
from hierfed.deploy.server import check_deployable, run_server
from hierfed.deploy.wire import reply_from_wire, reply_to_wire, state_from_bytes, state_to_bytes
from hierfed.engine.subtree import SubtreeReply
from hierfed.errors import HierfedError
from hierfed.simulation import build_federation
from hierfed.update import State

log = logging.getLogger(__name__)
REC = "hierfed"  # the one ConfigRecord of every message
PLAIN = "train.hierfed"  # a plain round (SecAgg+ rounds are Flower's "train" messages)

server = ServerApp()
client = ClientApp()


# ---------------------------------------------------------------- server side


def _say(text: str) -> None:
    """One progress line in the SuperLink's log (``flwr run --stream`` / ``flwr log``)."""
    print(f"[hierfed] {text}", flush=True)


class FlowerSites:
    """Dispatch over Flower: institution -> SuperNode, one ``train`` message each per round."""

    def __init__(self, grid: Grid, cfg: RunConfig, wanted: list[str], context: Context) -> None:
        self.grid, self.cfg, self.context = grid, cfg, context
        self.fed = build_federation(cfg)
        self.config_yaml = to_yaml(cfg)
        self.nodes = self._discover(wanted)
        self.wire = {"down_bytes": 0, "up_bytes": 0, "messages": 0}
        self.inner_bytes: dict[str, int] = {}

    def _discover(self, wanted: list[str]) -> dict[str, int]:
        """Each institution's SuperNode: by the name its key was registered under
        (``hierfed deploy register``: the identity is bound to the authenticated key), else —
        without SuperNode authentication — by asking each connected node, until all are found."""
        dep = self.cfg.deployment
        deadline = time.monotonic() + dep.connect_timeout_s
        by_name = {node_name(i): i for i in wanted}
        found: dict[str, int] = {}
        asked: set[int] = set()
        while True:
            online = set(self.grid.get_node_ids())
            if dep.supernode_auth:
                for info in self.grid.get_nodes():
                    inst = by_name.get(info.name)
                    if inst and info.node_id in online and inst not in found:
                        found[inst] = info.node_id
                        _say(f"SuperNode {info.node_id} serves {inst} (registered key)")
            else:
                self._ask(sorted(online - asked), asked, found)
            missing = [i for i in wanted if i not in found]
            if not missing:
                return {i: found[i] for i in wanted}
            if time.monotonic() > deadline:
                raise HierfedError(
                    f"no SuperNode for {missing} after {dep.connect_timeout_s:g} s "
                    f"(connected: {sorted(found) or 'none'}): start one per institution "
                    "(`python -m hierfed deploy supernode CONFIG --institution ID --key KEY`) "
                    "with a registered key (`hierfed deploy register`), or raise "
                    "deployment.connect_timeout_s"
                )
            time.sleep(0.5)

    def _ask(self, new: list[int], asked: set[int], found: dict[str, int]) -> None:
        """Ask nodes which institution they serve (only without SuperNode authentication)."""
        if not new:
            return
        msgs = [
            Message(RecordDict({REC: ConfigRecord({})}), dst_node_id=n, message_type="query")
            for n in new
        ]
        for r in self.grid.send_and_receive(msgs, timeout=60):
            node = r.metadata.src_node_id
            asked.add(node)
            if r.has_error():
                _say(f"SuperNode {node} did not say who it is: {r.error.reason}")
                continue
            inst = str(r.content[REC]["institution"])
            if inst in found and found[inst] != node:
                raise HierfedError(
                    f"two SuperNodes ({found[inst]}, {node}) serve '{inst}': give each "
                    "SuperNode its own --institution"
                )
            found[inst] = node
            _say(f"SuperNode {node} serves {inst} (it says)")

    def __call__(
        self, rnd: int, key: tuple, above: Mapping[str, State]
    ) -> dict[str, SubtreeReply | str]:
        fields = {inst: self._fields(rnd, key, inst, above[inst]) for inst in sorted(above)}
        for f in fields.values():
            self.wire["down_bytes"] += len(f["state"]) + len(self.config_yaml)
        if self.cfg.deployment.secagg:
            return self._secagg(rnd, fields, above)
        msgs, who = [], {}
        for inst, f in fields.items():
            node = self.nodes[inst]
            who[node] = inst
            rec = ConfigRecord(f)  # type: ignore[arg-type]
            msgs.append(Message(RecordDict({REC: rec}), dst_node_id=node, message_type=PLAIN))
        self.wire["messages"] += len(msgs)
        out: dict[str, SubtreeReply | str] = dict.fromkeys(
            above,
            f"no reply within deployment.round_timeout_s={self.cfg.deployment.round_timeout_s:g}"
            " s (SuperNode gone?)",
        )
        replies = self.grid.send_and_receive(msgs, timeout=self.cfg.deployment.round_timeout_s)
        for r in replies:
            inst = who.get(r.metadata.src_node_id, "")
            if not inst:
                continue
            self.wire["messages"] += 1
            if r.has_error():
                out[inst] = f"SuperNode error: {r.error.reason}"
                continue
            c = r.content[REC]
            if c.get("error"):
                out[inst] = str(c["error"])
                continue
            data, head = bytes(c["data"]), str(c["head"])  # type: ignore[arg-type]
            self.wire["up_bytes"] += len(data) + len(head)
            out[inst] = reply_from_wire(data, head)
            for edge, n in json.loads(str(c["inner"])).items():
                self.inner_bytes[edge] = self.inner_bytes.get(edge, 0) + int(n)
        return out

    def _fields(self, rnd: int, key: tuple, inst: str, above: State) -> dict[str, Any]:
        """One institution's instructions for round ``rnd`` (no secret: the root's broadcast)."""
        return {
            "institution": inst,
            "round": rnd,
            "key": json.dumps(list(key)),
            "config": self.config_yaml,
            "expected": json.dumps(institution_profile(self.fed, inst)),
            "state": state_to_bytes(above),
        }

    def _secagg(
        self, rnd: int, fields: dict[str, dict[str, Any]], above: Mapping[str, State]
    ) -> dict[str, SubtreeReply | str]:
        from hierfed.deploy.secagg import Layout
        from hierfed.deploy.secagg_flower import secagg_round

        scale = float(sum(c.num_train for c in self.fed.clients))  # public: every row counted
        layout = Layout.of(above[next(iter(fields))], scale)
        self.wire["messages"] += 8 * len(fields)  # four stages, there and back
        out, inner = secagg_round(
            grid=self.grid,
            context=self.context,
            cfg=self.cfg,
            nodes=self.nodes,
            messages=fields,
            layout=layout,
            rnd=rnd,
        )
        for r in out.values():
            if isinstance(r, SubtreeReply):
                self.wire["up_bytes"] += sum(r.sizes.values())
                self.wire["down_bytes"] += sum(r.down_sizes.values())
        for edge, n in inner.items():
            self.inner_bytes[edge] = self.inner_bytes.get(edge, 0) + n
        return out


def _server_config(context: Context) -> RunConfig:
    text = str(context.run_config.get("config-yaml", ""))
    if not text.strip():
        raise HierfedError(
            "the run has no hierfed config: launch it with `python -m hierfed deploy run "
            "CONFIG`, which passes the config as run-config 'config-yaml'"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(text)
        return load_config(path)


def _write_status(cfg: RunConfig, info: dict[str, Any]) -> None:
    """``deployment.json`` in the run folder: how the deployed run went (read by
    ``hierfed deploy run``)."""
    from hierfed.rundir import LOCK_NAME, RUN_FILES

    out = Path(cfg.out or "")
    if not cfg.out or (
        out.exists() and any(p.name not in RUN_FILES | {LOCK_NAME} for p in out.iterdir())
    ):
        return  # never write into a folder that is not a run's (a refused --out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deployment.json").write_text(json.dumps(info, indent=1, sort_keys=True))


@server.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = _server_config(context)
    t0 = time.perf_counter()
    sites: FlowerSites | None = None
    try:
        wanted = check_deployable(build_federation(cfg))
        _say(f"run folder {cfg.out}; waiting for SuperNodes of {wanted}")
        check_secagg(cfg)
        sites = FlowerSites(grid, cfg, wanted, context)

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "round":
                _say(f"round {data['round']}: loss {data.get('train_loss')} {data.get('global')}")

        overwrite = bool(context.run_config.get("overwrite", False))
        result = run_server(cfg, sites, on_event=on_event, overwrite=overwrite)
    except HierfedError as exc:
        _say(f"FAILED: {exc}")
        _write_status(cfg, {"error": str(exc), "wall_s": time.perf_counter() - t0})
        raise
    _write_status(
        cfg,
        {
            "error": None,
            "wall_s": time.perf_counter() - t0,
            "nodes": {i: str(n) for i, n in sites.nodes.items()},
            "flower_wire": sites.wire,
            "institution_inner_bytes": sites.inner_bytes,
            "secagg": cfg.deployment.secagg,
            "final": result.final_metrics,
        },
    )
    _say(f"done: {result.out_dir} final {result.final_metrics}")


# ---------------------------------------------------------------- client side


def _site(context: Context) -> InstitutionSite:
    nc = context.node_config
    inst = str(nc.get("institution", ""))
    if not inst:
        raise HierfedError(
            "this SuperNode serves no institution: start it with "
            '--node-config \'institution="global/inst-00" workdir="/var/lib/hierfed"\''
        )
    workdir = Path(str(nc.get("workdir", "~/.hierfed/supernode"))).expanduser()
    data = str(nc.get("data", "")) or None
    return InstitutionSite(
        institution=inst, workdir=workdir / inst.replace("/", "_"), data_yaml=data
    )


@client.query()
def _client_query(msg: Message, context: Context) -> Message:
    site = _site(context)
    rec = ConfigRecord({"institution": site.institution})
    return Message(RecordDict({REC: rec}), reply_to=msg)


def _round(c: Mapping[str, Any], context: Context) -> tuple[SubtreeReply, dict[str, int]]:
    """This SuperNode's institution runs the round ``c`` describes."""
    site = _site(context)
    if str(c["institution"]) != site.institution:
        raise SiteMismatch(
            f"the server addressed this SuperNode as '{c['institution']}' but it was "
            f"started for '{site.institution}': start it with the key registered for "
            "its own institution"
        )
    return site.round(
        run_id=str(context.run_id),
        config_yaml=str(c["config"]),
        rnd=int(c["round"]),
        key=tuple(json.loads(str(c["key"]))),
        above=state_from_bytes(bytes(c["state"])),
        expected=json.loads(str(c["expected"])),
    )


@client.train(mods=[secaggplus_mod])
def _client_secagg(msg: Message, context: Context) -> Message:
    from hierfed.deploy.secagg_flower import client_fit

    try:
        return client_fit(msg, lambda conf: _round(conf, context))
    except HierfedError as exc:  # the workflow sees a dropout; the reason stays in this log
        log.error("SecAgg+ round refused: %s", exc)
        raise


@client.train("hierfed")
def _client_train(msg: Message, context: Context) -> Message:
    c = msg.content[REC]
    try:
        reply, inner = _round(c, context)
    except HierfedError as exc:  # a clear one-line reason for the server's log and quorum
        return Message(RecordDict({REC: ConfigRecord({"error": str(exc)})}), reply_to=msg)
    data, head = reply_to_wire(reply)
    rec = ConfigRecord({"data": data, "head": head, "inner": json.dumps(inner)})
    return Message(RecordDict({REC: rec}), reply_to=msg)
