"""``exclude``: an excluded client (or subtree) is dropped right after sampling, and nobody
else's draws, keys or batches move: a run with ``exclude=[X]`` equals the original bit for bit
in every round before X is first drawn, and no ledger record touches X."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hierfed.config import TierConfig, load_config
from hierfed.engine.sampling import draw
from hierfed.errors import ConfigError
from hierfed.ledger import CommLedger
from hierfed.resume import read_checkpoint
from hierfed.simulation import build_federation, run
from hierfed.unlearning.exclusion import excluded_clients, excluded_members
from tests.conftest import tiny_overrides

ROUNDS = 4
# one institution of three per round, two students of three per institution-round: clients and
# institutions are first drawn in different rounds, so a prefix of the run is untouched
OVERRIDES = tiny_overrides(
    **{
        "runtime.name": "local",
        "rounds": ROUNDS,
        "topology.tiers.global.participation": 0.3,
        "topology.tiers.institution.participation": 0.4,
        "checkpoint.keep": 10,
    }
)


def touches(name: str, x: str) -> bool:
    return name == x or name.startswith(x + "/")


def first_round(run_dir: Path, x: str) -> int | None:
    """The first round in which a ledger record names ``x`` or a node below it."""
    rounds = [
        r.round
        for r in CommLedger.load(run_dir / "ledger.csv").records
        if touches(r.src, x) or touches(r.dst, x)
    ]
    return min(rounds, default=None)


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b) or (a != a and b != b)  # NaN == NaN here


def bundle(run_dir: Path, rnd: int) -> dict[str, Any]:
    ck = read_checkpoint(run_dir, rnd)
    ck["ledger"] = ck["ledger"].records
    for m in ck["metrics"]:
        m.pop("wall_s", None)
    ck.pop("config")  # the config fingerprint names the exclusion
    return ck


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("orig")
    run(load_config(None, OVERRIDES, out=str(out)))
    return out


def latest_drawn(run_dir: Path, ids: list[str]) -> tuple[str, int]:
    """Of ``ids``, the one drawn first the latest (but drawn), and that round."""
    firsts = {x: r for x in ids if (r := first_round(run_dir, x)) is not None}
    x = max(sorted(firsts), key=lambda k: firsts[k])
    return x, firsts[x]


@pytest.mark.parametrize("kind", ["student", "institution"])
def test_exclusion_leaves_every_round_before_the_first_draw_unchanged(tmp_path, original, kind):
    fed = build_federation(load_config(None, OVERRIDES))
    ids = sorted({c.id if kind == "student" else "/".join(c.path[:2]) for c in fed.clients})
    x, first = latest_drawn(original, ids)
    assert 2 <= first <= ROUNDS, f"{x} is first drawn in round {first}: the test needs 2..{ROUNDS}"
    out = tmp_path / "excl"
    run(load_config(None, [*OVERRIDES, f"exclude=[{x}]"], out=str(out)))
    for rnd in range(1, first):
        assert same(bundle(original, rnd), bundle(out, rnd)), f"round {rnd} moved"
    # from the first draw on, the runs part: X's data is gone
    assert not same(bundle(original, first)["topology"], bundle(out, first)["topology"])
    records = CommLedger.load(out / "ledger.csv").records
    assert records and not [r for r in records if touches(r.src, x) or touches(r.dst, x)]


def test_gossip_excluded_node_neither_trains_nor_mixes(tmp_path):
    from hierfed.runtime.base import make_runtime
    from hierfed.runtime.worker import WorkerSetup

    x = "global/inst-01/student-002"
    ov = tiny_overrides(**{"runtime.name": "local", "rounds": 2, "topology.options.graph": "ring"})
    base = run(load_config(None, ov, topology="gossip"), write=False)
    cfg = load_config(None, [*ov, f"exclude=[{x}]"], topology="gossip", out=str(tmp_path / "g"))
    res = run(cfg)
    assert [r for r in base.ledger.records if x in (r.src, r.dst)]  # it mixes when not excluded
    assert not [r for r in res.ledger.records if x in (r.src, r.dst)]
    rt = make_runtime(cfg.runtime)
    rt.start(WorkerSetup(cfg, build_federation(cfg)))
    try:
        _, initial = rt.model_info()
    finally:
        rt.shutdown()
    states = read_checkpoint(tmp_path / "g", 2)["topology"]
    mine = states["states"][x]
    assert mine and all(torch.equal(v, initial[c][k]) for c in mine for k, v in mine[c].items())
    # and the others did train (the run is not vacuous)
    other = states["states"]["global/inst-01/student-001"]
    assert any(not torch.equal(v, initial[c][k]) for c in other for k, v in other[c].items())


# ---------------------------------------------------------------- the ids and the rule


def test_a_draw_drops_the_excluded_and_keeps_the_others_draws():
    members = [f"s{i}" for i in range(10)]
    tier = TierConfig(participation=0.5, dropout=0.3)
    plain = draw(seed=3, node="n", members=members, tier=tier, rnd=2, key=(0,))
    out = plain.sampled[1]
    less = draw(seed=3, node="n", members=members, tier=tier, rnd=2, key=(0,), excluded={out})
    assert less.full == plain.full and out not in less.sampled
    assert less.sampled == [c for c in plain.sampled if c != out]  # order kept
    assert less.gone == plain.gone - {out}


def test_a_node_whose_clients_are_all_excluded_is_excluded():
    below = {"i1": ["s1", "s2"], "i2": ["s3"], "s1": ["s1"], "s2": ["s2"], "s3": ["s3"]}
    assert excluded_members(frozenset({"s1", "s2"}), below) == {"i1", "s1", "s2"}
    assert excluded_members(frozenset({"s1"}), below) == {"s1"}
    assert excluded_members(frozenset(), below) == frozenset()


@pytest.mark.parametrize(
    "ids, fragment",
    [
        (["global/inst-09"], "no client or tier node has this id"),
        (["student-001"], "no client or tier node has this id"),
        (["global/inst-00", "global/inst-00"], "already removed by 'global/inst-00'"),
        (["global/inst-00", "global/inst-00/student-001"], "already removed"),
        (["global/inst-00", "global/inst-01", "global/inst-02"], "removes every client"),
    ],
)
def test_bad_exclusions_fail_in_one_line_naming_the_key(ids, fragment):
    cfg = load_config(None, [*tiny_overrides(), f"exclude=[{','.join(ids)}]"])
    with pytest.raises(ConfigError) as err:
        excluded_clients(cfg, build_federation(cfg))
    msg = str(err.value)
    assert "exclude" in msg and fragment in msg and "\n" not in msg


def test_an_institution_id_removes_its_students():
    cfg = load_config(None, [*tiny_overrides(), "exclude=[global/inst-01]"])
    fed = build_federation(cfg)
    want = {c.id for c in fed.clients if c.id.startswith("global/inst-01/")}
    assert len(want) == 3
    assert excluded_clients(cfg, fed) == want


def test_an_unknown_id_is_refused_before_any_worker_starts(monkeypatch):
    import hierfed.simulation as simulation

    def no_runtime(*args, **kwargs):
        raise AssertionError("a runtime was started")

    monkeypatch.setattr(simulation, "make_runtime", no_runtime)
    cfg = load_config(None, [*tiny_overrides(**{"runtime.name": "ray"}), "exclude=[global/inst-7]"])
    with pytest.raises(ConfigError, match="exclude"):
        run(cfg, write=False)


def test_a_round_whose_whole_draw_is_excluded_leaves_the_model_as_it_was(tmp_path):
    # star, one client of nine per round: exclude the clients drawn in round 2
    ov = tiny_overrides(
        **{
            "runtime.name": "local",
            "rounds": 3,
            "topology.default.participation": 0.1,
            "checkpoint.keep": 10,
        }
    )
    base = run(load_config(None, ov, topology="star"), write=False)
    drawn = {r.round: r.dst for r in base.ledger.records if r.direction == "down"}
    x = drawn[2]
    assert x not in (drawn[1], drawn[3]), "the test needs a client drawn in round 2 only"
    out = tmp_path / "star"
    res = run(load_config(None, [*ov, f"exclude=[{x}]"], topology="star", out=str(out)))
    assert res.metrics[2]["participants"] == 0
    assert not [r for r in res.ledger.records if r.round == 2]
    one = read_checkpoint(out, 1)["topology"]["engine.states"]
    two = read_checkpoint(out, 2)["topology"]["engine.states"]
    assert same(one, two)


VARIANTS = {
    # students gossip device to device: an excluded student's ring links are down
    "leaf-gossip": [
        "topology.tiers.student.peer_steps=1",
        "topology.tiers.student.peer_graph=ring",
        "topology.tiers.student.local_rounds=2",
    ],
    # institutions mix with their sampled siblings; students drop out
    "inner-peers-dropout": [
        "topology.tiers.institution.dropout=0.3",
        "topology.tiers.global.participation=0.67",
        "topology.tiers.global.peer_steps=0",
        "topology.tiers.institution.peer_steps=1",
        "topology.tiers.institution.peer_graph=complete",
    ],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exclusion_prefix_is_unchanged_with_peers_and_dropouts(tmp_path, variant):
    ov = [*OVERRIDES, *VARIANTS[variant]]
    orig = tmp_path / "orig"
    run(load_config(None, ov, out=str(orig)))
    fed = build_federation(load_config(None, ov))
    x, first = latest_drawn(orig, [c.id for c in fed.clients])
    assert 2 <= first <= ROUNDS, f"{x} is first drawn in round {first}"
    out = tmp_path / "excl"
    run(load_config(None, [*ov, f"exclude=[{x}]"], out=str(out)))
    for rnd in range(1, first):
        assert same(bundle(orig, rnd), bundle(out, rnd)), f"round {rnd} moved"
    assert not same(bundle(orig, first)["topology"], bundle(out, first)["topology"])
    assert not [r for r in CommLedger.load(out / "ledger.csv").records if x in (r.src, r.dst)]
