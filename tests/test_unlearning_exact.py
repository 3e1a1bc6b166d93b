"""Exact unlearning: the replayed run equals, bit for bit, a fresh run that excluded the removed
clients from the start; it replays only the rounds after their first use; bad requests fail in
one line and leave the original run folder as it was."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from hierfed.config import load_config
from hierfed.errors import CheckpointError, ConfigError, HierfedError
from hierfed.ledger import CommLedger
from hierfed.simulation import build_federation, run
from hierfed.unlearning.replay import first_round_using, unlearn_exact
from tests.conftest import tiny_overrides
from tests.test_unlearning_exclusion import OVERRIDES, ROUNDS  # the same federation


def folder_digest(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def outcome(run_dir: Path) -> tuple[str, list[dict], bytes]:
    """What must match: the final state's bytes, every metrics record (wall time aside) and
    the ledger."""
    state = hashlib.sha256((run_dir / "final_state.safetensors").read_bytes()).hexdigest()
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        m.pop("wall_s", None)
    return state, metrics, (run_dir / "ledger.csv").read_bytes()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("orig")
    run(load_config(None, OVERRIDES, out=str(out)))
    return out


def firsts(run_dir: Path, ids: list[str]) -> dict[str, int | None]:
    ledger = CommLedger.load(run_dir / "ledger.csv")
    return {x: first_round_using(ledger, [x], frozenset()) for x in ids}


def pick(run_dir: Path, kind: str) -> tuple[str, int]:
    """The student or institution first used the latest (but used)."""
    fed = build_federation(load_config(None, OVERRIDES))
    ids = sorted({c.id if kind == "student" else "/".join(c.path[:2]) for c in fed.clients})
    used = {x: r for x, r in firsts(run_dir, ids).items() if r is not None}
    x = max(sorted(used), key=lambda k: used[k])
    return x, used[x]


@pytest.mark.parametrize("kind", ["student", "institution"])
def test_exact_unlearning_equals_a_fresh_run_without_them(tmp_path, original, kind):
    x, first = pick(original, kind)
    assert 2 <= first <= ROUNDS, f"{x} first used in round {first}; the test needs 2..{ROUNDS}"
    before = folder_digest(original)
    flag = {"clients": [x]} if kind == "student" else {"nodes": [x]}
    res = unlearn_exact(original, out=tmp_path / "unlearned", **flag)
    assert res.plan.first_round == first
    assert res.plan.start_round == first - 1  # the newest checkpoint before their data (keep=10)
    assert res.plan.rounds_replayed == ROUNDS - first + 1 < ROUNDS
    assert res.checkpoint_sha256 is not None
    fresh = tmp_path / "fresh"
    run(load_config(None, [*OVERRIDES, f"exclude=[{x}]"], out=str(fresh)))
    assert outcome(tmp_path / "unlearned") == outcome(fresh)
    assert outcome(tmp_path / "unlearned")[0] != outcome(original)[0]  # they did count
    assert folder_digest(original) == before  # the original run is only read


def test_a_client_who_never_took_part_changes_nothing_and_replays_nothing(tmp_path, original):
    fed = build_federation(load_config(None, OVERRIDES))
    never = [x for x, r in firsts(original, [c.id for c in fed.clients]).items() if r is None]
    assert never, "the test needs a client the run never drew"
    res = unlearn_exact(original, out=tmp_path / "u", clients=[never[0]])
    assert res.plan.first_round is None
    assert res.plan.start_round == ROUNDS and res.plan.rounds_replayed == 0
    assert outcome(tmp_path / "u") == outcome(original)


def test_bad_requests_fail_in_one_line_and_leave_the_run_untouched(tmp_path, original):
    before = folder_digest(original)
    x, _ = pick(original, "student")
    inst = "/".join(x.split("/")[:2])
    cases: list[tuple[dict, type[Exception], str]] = [
        ({"clients": ["global/inst-00/student-099"]}, ConfigError, "--client"),
        ({"nodes": [x]}, ConfigError, "pass it with --client"),
        ({"clients": [inst]}, ConfigError, "pass it with --institution"),
        ({"clients": [x, x]}, ConfigError, "given twice"),
        ({"nodes": [inst], "clients": [x]}, ConfigError, "already removed"),
        ({}, ConfigError, "at least one"),
    ]
    for i, (flags, exc, fragment) in enumerate(cases):
        with pytest.raises(exc) as err:
            unlearn_exact(original, out=tmp_path / f"bad{i}", **flags)
        assert fragment in str(err.value) and "\n" not in str(err.value), flags
        assert not (tmp_path / f"bad{i}").exists()
    with pytest.raises(ConfigError, match="--out"):
        unlearn_exact(original, out=original, clients=[x])
    with pytest.raises(ConfigError, match="runtime"):
        unlearn_exact(original, out=tmp_path / "o", clients=[x], overrides=["train.lr=0.5"])
    bare = tmp_path / "bare"
    shutil.copytree(original, bare, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(CheckpointError, match="no checkpoints"):
        unlearn_exact(bare, out=tmp_path / "o2", clients=[x])
    with pytest.raises(HierfedError, match="not a run folder"):
        unlearn_exact(tmp_path / "nowhere", out=tmp_path / "o3", clients=[x])
    assert folder_digest(original) == before


def test_removing_a_client_twice_is_refused(tmp_path, original):
    x, _ = pick(original, "institution")
    unlearn_exact(original, out=tmp_path / "once", nodes=[x])
    with pytest.raises(ConfigError, match="already excluded"):
        unlearn_exact(tmp_path / "once", out=tmp_path / "twice", nodes=[x])
    student = next(
        c.id
        for c in build_federation(load_config(None, OVERRIDES)).clients
        if c.id.startswith(x + "/")
    )
    with pytest.raises(ConfigError, match="already excluded"):
        unlearn_exact(tmp_path / "once", out=tmp_path / "twice", clients=[student])
    assert not (tmp_path / "twice").exists()


@pytest.mark.usefixtures("ray_session")
def test_exact_unlearning_on_ray_with_two_workers_equals_the_local_fresh_run(tmp_path, original):
    x, _ = pick(original, "student")
    overrides = ["runtime.name=ray", "runtime.num_workers=2"]
    res = unlearn_exact(original, out=tmp_path / "ray", clients=[x], overrides=overrides)
    assert res.plan.start_round >= 1
    fresh = tmp_path / "fresh"
    run(load_config(None, [*OVERRIDES, f"exclude=[{x}]"], out=str(fresh)))
    assert outcome(tmp_path / "ray") == outcome(fresh)


def test_cli_writes_a_certificate_a_reader_can_check(tmp_path, original, capsys):
    from hierfed.cli import main
    from hierfed.simulation import _fingerprint
    from hierfed.unlearning.replay import _folder_sha256

    x, first = pick(original, "student")
    short = x.split("/", 1)[1]  # inst-0k/student-00j: the unique tail is enough
    new = tmp_path / "new"
    assert main(["unlearn", str(original), "--client", short, "--out", str(new), "--quiet"]) == 0
    cert = json.loads((new / "unlearning.json").read_text())
    assert cert["method"] == "exact" and cert["removed"] == [x] == cert["removed_clients"]
    assert cert["first_round_with_their_data"] == first
    frm = cert["replayed_from"]
    assert frm["round"] == first - 1
    assert frm["sha256"] == _folder_sha256(original / frm["checkpoint"])
    assert cert["rounds"] == {"total": ROUNDS, "reused": first - 1, "replayed": ROUNDS - first + 1}
    assert (
        cert["final_state_sha256"]
        == hashlib.sha256((new / "final_state.safetensors").read_bytes()).hexdigest()
    )
    assert cert["config"]["fingerprint"] == _fingerprint(load_config(new / "config.yaml"))
    assert cert["config"]["exclude"] == [x]
    mia = cert["verification"]["membership_inference"]
    assert 0 <= mia["original"]["auc"] <= 1 and 0 <= mia["unlearned"]["auc"] <= 1
    assert mia["rows"]["members"] > 0 and mia["rows"]["non_members"] > 0
    dist = cert["verification"]["l2_distance_original_to_unlearned"]
    assert dist and max(dist.values()) > 0
    assert cert["compute"]["replay_wall_s"] > 0
    # the check the certificate describes: a run from scratch of the new config
    again = tmp_path / "again"
    assert main(["run", "--quiet", "--config", str(new / "config.yaml"), "--out", str(again)]) == 0
    assert outcome(again) == outcome(new)
    # bad input: one line, exit code 2, nothing written
    capsys.readouterr()
    bad = ["unlearn", str(original), "--institution", "inst-09", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    err = capsys.readouterr().out.strip()
    assert "--institution" in err and "no such id" in err
    assert not (tmp_path / "b").exists()


def test_approximate_unlearning_is_labelled_and_measured_against_exact(tmp_path, original):
    from hierfed.checkpoint import load_state
    from hierfed.unlearning.approx import ascend, certify_approximate, unlearn_approximate
    from hierfed.unlearning.verify import membership_auc

    x, _ = pick(original, "student")
    unlearn_exact(original, out=tmp_path / "exact", clients=[x])
    res = unlearn_approximate(original, out=tmp_path / "approx", clients=[x], repair_rounds=1)
    cert = certify_approximate(res, original, exact_dir=tmp_path / "exact")
    assert cert["method"] == "approximate" and "NOT bit-identical" in cert["approximation"]
    assert json.loads((tmp_path / "approx" / "unlearning.json").read_text()) == cert
    # one repair round after the original's last, without them
    records = CommLedger.load(tmp_path / "approx" / "ledger.csv").records
    repair = [r for r in records if r.round == ROUNDS + 1]
    assert repair and not [r for r in repair if x in (r.src, r.dst)]
    assert cert["verification"]["l2_distance_total"]["approximate_vs_exact"] > 0
    assert set(cert["verification"]["membership_inference"]) >= {"original", "approximate", "exact"}
    # the ascent raises their training loss
    cfg = load_config(original / "config.yaml")
    fed = build_federation(cfg)
    before, _ = load_state(original / "final_state")
    after = ascend(cfg, fed, before, [x])
    loss = membership_auc(cfg, fed, {"before": before, "after": after}, [x])
    assert loss["after"]["member_loss_mean"] > loss["before"]["member_loss_mean"]


def test_a_gossip_run_is_unlearned_from_round_zero_and_equals_a_fresh_run(tmp_path):
    ov = tiny_overrides(**{"runtime.name": "local", "rounds": 2, "topology.options.graph": "ring"})
    orig = tmp_path / "orig"
    run(load_config(None, ov, topology="gossip", out=str(orig)))
    x = "global/inst-01/student-002"
    res = unlearn_exact(orig, out=tmp_path / "u", clients=[x])
    assert res.plan.start_round == 0 and res.plan.rounds_replayed == 2
    fresh = tmp_path / "fresh"
    run(load_config(None, [*ov, f"exclude=[{x}]"], topology="gossip", out=str(fresh)))
    assert outcome(tmp_path / "u") == outcome(fresh)
