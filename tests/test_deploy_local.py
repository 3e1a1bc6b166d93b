"""A deployment's two sides in one process (no Flower): every institution's subtree run on its
own site, through the wire format, reproduces the simulated run; bad sites are refused with
one line naming the fix, and the server keeps what it had."""

from __future__ import annotations

import json
import os
import socket
import ssl

import pytest
import torch

from hierfed.config import load_config
from hierfed.deploy.certs import make_credentials
from hierfed.deploy.node import InstitutionSite, SiteMismatch, institution_profile
from hierfed.deploy.preflight import SuperLinkUnreachable, check_superlink
from hierfed.deploy.server import LocalSites, run_server
from hierfed.deploy.wire import reply_from_wire, reply_to_wire
from hierfed.engine.subtree import SubtreeReply
from hierfed.errors import ConfigError, HierfedError, NodeFailure
from hierfed.simulation import build_federation, run
from hierfed.update import Update
from tests.conftest import tiny_overrides

FULL = os.environ.get("HIERFED_DEPLOY_FULL") == "1"  # the heavier drills (docs/deployment.md)

# tier-scoped prompts (kept at the institutions), two institution rounds per global round with
# sampled students, sampled institutions and a server optimizer with state at the root
RICH = tiny_overrides(
    **{
        "runtime.name": "local",
        "rounds": 2,
        "eval.equity": "false",
        "model.scopes": "{'prompt.*': institution}",
        "topology.tiers.institution.local_rounds": 2,
        "topology.tiers.institution.participation": 0.67,
        "topology.tiers.global.participation": 0.67,
        "topology.tiers.global.server_optimizer": "fedadam",
        "topology.tiers.global.server_lr": 0.05,
    }
)


def _top(ledger):
    return sorted(
        (t.round, t.src, t.dst, t.component, t.nbytes) for t in ledger.records if "global" in t.edge
    )


def test_sites_reproduce_the_simulated_run_exactly(tmp_path):
    sim = run(load_config(None, RICH, out=str(tmp_path / "sim")))
    cfg = load_config(None, RICH, out=str(tmp_path / "dep"))
    sites = LocalSites(cfg, tmp_path / "sites")
    dep = run_server(cfg, sites)
    assert sim.final_state.keys() == dep.final_state.keys()
    for c, params in sim.final_state.items():
        for p, t in params.items():
            assert torch.equal(t, dep.final_state[c][p]), f"{c}/{p}"
    # the top edge's transfers, byte for byte; the inner edges stayed at the sites
    assert _top(dep.ledger) == _top(sim.ledger)
    assert set(dep.ledger.by_edge()) == {"global->institution", "institution->global"}
    inner = {e: n for e, n in sim.ledger.by_edge().items() if "global" not in e}
    assert sites.inner_bytes == inner
    for a, b in zip(sim.metrics, dep.metrics):
        assert a.get("global") == b.get("global")
        assert a.get("sim_time_s") == b.get("sim_time_s")
        assert a.get("participants") == b.get("participants")
    # each site kept its own state and ledger, one folder per run
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == [
        "global_inst-00",
        "global_inst-01",
        "global_inst-02",
    ]
    assert (tmp_path / "sites" / "global_inst-00" / "run-local" / "ledger.csv").exists()


def test_reply_survives_the_wire_bit_for_bit():
    u = Update.from_delta(
        {"head.t": {"w": torch.tensor([0.1, -2.0], dtype=torch.float16)}},
        {"head.t": 2.5},
        sender="global/inst-01",
        round=3,
        num_samples=40,
        stats={"loss": 0.75},
    )
    r = SubtreeReply(
        node_id="global/inst-01",
        update=u,
        sizes={"head.t": 4},
        elapsed_s=1.25,
        participants=2,
        loss_sum=30.0,
        loss_rows=40,
        failures=(("s1", "boom"),),
        dropped=("s2",),
        privacy={"s3": {"epsilon": float("inf")}},
    )
    back = reply_from_wire(*reply_to_wire(r))
    assert back.update is not None
    t = back.update.tensors["head.t"]["w"]
    assert t.dtype == torch.float16 and torch.equal(t, u.tensors["head.t"]["w"] * 1)
    assert back.update.weights == {"head.t": 2.5}
    assert back.update.meta == u.meta
    assert (back.sizes, back.elapsed_s, back.failures, back.dropped) == (
        {"head.t": 4},
        1.25,
        (("s1", "boom"),),
        ("s2",),
    )
    assert back.privacy["s3"]["epsilon"] == float("inf")


def test_site_with_other_data_is_refused_naming_the_fix(tmp_path):
    cfg = load_config(None, RICH, out=str(tmp_path / "dep"))
    fed = build_federation(cfg)
    other = tmp_path / "mine.yaml"
    other.write_text("data:\n  num_institutions: 3\n  samples_per_student: 30\n")
    site = InstitutionSite(
        institution="global/inst-00", workdir=tmp_path / "s", data_yaml=str(other)
    )
    from hierfed.config import to_yaml

    with pytest.raises(SiteMismatch, match="does not match the server's config") as err:
        site.round(
            run_id="r",
            config_yaml=to_yaml(cfg),
            rnd=1,
            key=(0,),
            above={},
            expected=institution_profile(fed, "global/inst-00"),
        )
    assert "node-config 'data'" in str(err.value) and "\n" not in str(err.value)
    wrong = InstitutionSite(institution="global/inst-09", workdir=tmp_path / "w")
    with pytest.raises(SiteMismatch, match=r"known: global/inst-00, global/inst-01"):
        wrong.check(cfg, fed, {})


def test_a_failed_site_fails_the_run_and_the_server_keeps_its_checkpoints(tmp_path):
    cfg = load_config(None, RICH, out=str(tmp_path / "dep"))
    sites = LocalSites(cfg, tmp_path / "sites")
    real = sites.__call__

    def flaky(rnd, key, above):
        out = real(rnd, key, above)
        if rnd == 2:
            out[sorted(out)[0]] = "SuperNode error: gone"
        return out

    with pytest.raises(NodeFailure, match="failed in round 2: SuperNode error: gone"):
        run_server(cfg, flaky)
    ck = sorted(p.name for p in (tmp_path / "dep" / "checkpoints").iterdir())
    assert "round-0001" in ck
    lines = (tmp_path / "dep" / "checkpoints" / "metrics.log").read_text().splitlines()
    assert [json.loads(x)["__d__"]["round"] for x in lines] == [0, 1]  # packed records


@pytest.mark.skipif(not FULL, reason="set HIERFED_DEPLOY_FULL=1 (a second run)")
def test_a_dropped_site_is_tolerated_when_the_quorum_allows(tmp_path):
    extra = {"runtime.on_client_failure": "drop", "topology.tiers.global.quorum": 0.5}
    ov = RICH + [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(None, ov, out=str(tmp_path / "dep"))

    def losing_one(sites):
        def dispatch(rnd, key, above):
            out = sites(rnd, key, above)
            out[sorted(out)[0]] = "no reply"
            return out

        return dispatch

    res = run_server(cfg, losing_one(LocalSites(cfg, tmp_path / "sites", run_id="a")))
    assert [m["failed"] for m in res.metrics[1:]] == [
        1,
        1,
    ]  # 1 of the 3 sampled (ceil(0.67 * 3)), each round
    strict = load_config(
        None, ov + ["topology.tiers.global.quorum=1.0", "rounds=1"], out=str(tmp_path / "q")
    )
    with pytest.raises(NodeFailure, match=r"quorum 1 not met: 2/3 .*no reply"):
        run_server(strict, losing_one(LocalSites(strict, tmp_path / "sites", run_id="b")))


def test_sites_refuse_a_round_out_of_step(tmp_path):
    cfg = load_config(None, RICH, out=str(tmp_path / "dep"))
    fed = build_federation(cfg)
    from hierfed.config import to_yaml

    site = InstitutionSite(institution="global/inst-00", workdir=tmp_path / "s")
    with pytest.raises(
        SiteMismatch, match="has done round 0 of this run and was asked for round 2"
    ):
        site.round(
            run_id="r",
            config_yaml=to_yaml(cfg),
            rnd=2,
            key=(0,),
            above={},
            expected=institution_profile(fed, "global/inst-00"),
        )


def test_deploy_refuses_a_tree_without_institutions(tmp_path):
    cfg = load_config(None, RICH, topology="star", out=str(tmp_path / "s"))
    with pytest.raises(HierfedError, match="use hierarchical"):
        run_server(cfg, lambda *a: {})
    assert not (tmp_path / "s").exists()


def test_trial_credentials_verify_and_others_do_not(tmp_path):
    creds = make_credentials(tmp_path / "a", nodes=["inst-00"])
    other = make_credentials(tmp_path / "b", nodes=[])
    assert (creds.node_keys["inst-00"][1].read_text()).startswith("ecdsa-sha2-nistp384 ")
    assert oct(creds.node_keys["inst-00"][0].stat().st_mode & 0o777) == "0o600"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds.server_cert, creds.server_key)
    import threading

    def serve():
        for _ in range(2):
            conn, _ = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    check_superlink(f"127.0.0.1:{port}", root_certificates=str(creds.ca_cert))
    with pytest.raises(SuperLinkUnreachable, match="does not verify against .*use the CA"):
        check_superlink(f"127.0.0.1:{port}", root_certificates=str(other.ca_cert))
    th.join(5)
    srv.close()
    with pytest.raises(SuperLinkUnreachable, match="cannot reach the SuperLink .* start it"):
        check_superlink(f"127.0.0.1:{port}", root_certificates=str(creds.ca_cert))
    with pytest.raises(HierfedError, match="already holds a CA"):
        make_credentials(tmp_path / "a", nodes=[])


def test_commands_are_secure_by_default_and_insecure_only_when_asked(tmp_path, capsys):
    from hierfed.deploy import command

    creds = make_credentials(tmp_path / "c", nodes=["inst-00"])
    dep = [
        f"deployment.root_certificates={creds.ca_cert}",
        f"deployment.ssl_certfile={creds.server_cert}",
        f"deployment.ssl_keyfile={creds.server_key}",
        f"deployment.node_keys={{global/inst-00: {creds.node_keys['inst-00'][1]}}}",
    ]
    cfg = load_config(None, RICH + dep)
    link = command.superlink_command(cfg)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    assert link[link.index("--ssl-certfile") + 1] == str(creds.server_cert.resolve())
    node = command.supernode_command(
        cfg, institution="global/inst-00", key=str(creds.node_keys["inst-00"][0]), workdir="w"
    )
    assert "--root-certificates" in node and "--auth-supernode-private-key" in node
    assert node[-1].startswith('institution="global/inst-00" workdir=')
    reg = command.register_commands(cfg)
    assert reg[0][-2:] == ["--name", "global_inst-00"]
    assert capsys.readouterr().err == ""  # nothing to warn about
    with pytest.raises(ConfigError, match=r"deployment.supernode_auth is on: pass this"):
        command.supernode_command(cfg, institution="global/inst-00", key=None, workdir="w")
    bare = load_config(None, RICH)
    with pytest.raises(ConfigError, match=r"deployment.ssl_certfile.*deploy certs DIR"):
        command.superlink_command(bare)
    insecure = load_config(None, RICH + ["deployment.insecure=true"])
    with pytest.raises(ConfigError, match="SuperNode authentication needs TLS"):
        command.superlink_command(insecure)  # Flower would refuse it too
    insecure = load_config(
        None, RICH + ["deployment.insecure=true", "deployment.supernode_auth=false"]
    )
    command._WARNED.clear()
    link = command.superlink_command(insecure)
    assert "--insecure" in link and "--enable-supernode-auth" not in link
    assert "no TLS" in capsys.readouterr().err
