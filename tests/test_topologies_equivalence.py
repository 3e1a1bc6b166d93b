"""With one institution round and plain FedAvg steps, hierarchical and star merge to the same
weighted mean: the pre-weighted Update makes the tree invisible to the math."""

from __future__ import annotations

import torch

from hierfed.config import load_config
from hierfed.simulation import run
from tests.conftest import tiny_overrides


def test_hierarchical_with_one_local_round_equals_star(tmp_path):
    extra = {"runtime.name": "local", "rounds": 2, "model.scopes": "{}"}
    star = run(
        load_config(None, tiny_overrides(**extra), topology="star", out=str(tmp_path / "s")),
        write=False,
    )
    hier = run(
        load_config(
            None, tiny_overrides(**extra), topology="hierarchical", out=str(tmp_path / "h")
        ),
        write=False,
    )
    assert set(star.final_state) == set(hier.final_state)
    for c in star.final_state:
        for p in star.final_state[c]:
            a, b = star.final_state[c][p], hier.final_state[c][p]
            # equal up to float summation order (the tree sums in two stages)
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (
                f"{c}/{p}: {float((a - b).abs().max())}"
            )
    # and the tree is not a no-op: the institution tier moved bytes the star did not
    assert (
        "institution->global" in hier.ledger.by_edge()
        and "institution->global" not in star.ledger.by_edge()
    )


def test_two_institution_rounds_differ_from_one(tmp_path):
    base = {"runtime.name": "local", "rounds": 1}
    one = run(load_config(None, tiny_overrides(**base), out=str(tmp_path / "a")), write=False)
    two = run(
        load_config(
            None,
            tiny_overrides(**base, **{"topology.tiers.institution.local_rounds": 2}),
            out=str(tmp_path / "b"),
        ),
        write=False,
    )
    assert any(
        not torch.equal(one.final_state["head.digit"][p], two.final_state["head.digit"][p])
        for p in one.final_state["head.digit"]
    )
    # k institution rounds = k broadcasts to the students per global round
    down_one = one.ledger.by_edge()["institution->student"]
    assert two.ledger.by_edge()["institution->student"] == 2 * down_one
