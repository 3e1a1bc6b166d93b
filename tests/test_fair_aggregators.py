"""q-FFL and agnostic FL, by hand on two or three clients; q = 0 is FedAvg bit for bit."""

from __future__ import annotations

import pytest
import torch

from hierfed.aggregators import QFFL, AggContext, AgnosticFL, WeightedMean
from hierfed.aggregators.fair import project_simplex
from hierfed.errors import ConfigError
from hierfed.update import Update, merge_stats

CTX = AggContext("global/lea-1", "lea", 1, 0)


def upd(sender, values, w, loss, comp="head.t", n=0):
    delta = {comp: {"w": torch.tensor(values, dtype=torch.float32)}}
    return Update.from_delta(delta, w, sender=sender, round=1, num_samples=n, stats={"loss": loss})


def test_qffl_with_q_zero_is_fedavg_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    ups = [
        Update.from_delta(
            {
                "head.t": {"w": torch.randn(5, generator=g)},
                "enc.x": {"b": torch.randn(3, generator=g)},
            },
            {"head.t": w, "enc.x": w / 2},
            sender=s,
            round=1,
            stats={"loss": loss},
        )
        for s, w, loss in [("a", 3.0, 0.2), ("b", 7.0, 1.9), ("c", 1.0, 4.0)]
    ]
    ups.append(upd("d", [0.1] * 5, 2.0, 0.5))  # holds head.t only
    fair, _ = QFFL({"q": 0.0, "lipschitz": 50.0}).aggregate(ups, None, CTX)
    avg, _ = WeightedMean({}).aggregate(ups, None, CTX)
    assert fair.weights == avg.weights
    for c in avg.tensors:
        for p in avg.tensors[c]:
            assert torch.equal(fair.tensors[c][p], avg.tensors[c][p])


def test_qffl_by_hand_without_the_step_size_term():
    # e = sum p F d / sum p F = (1*1*1 + 3*3*4) / (1*1 + 3*3) = 37 / 10
    ups = [upd("a", [1.0], 1.0, 1.0), upd("b", [4.0], 3.0, 3.0)]
    merged, _ = QFFL({"q": 1.0, "lipschitz": 0.0}).aggregate(ups, None, CTX)
    assert merged.mean()["head.t"]["w"].item() == pytest.approx(3.7)
    assert merged.weights == {"head.t": 4.0}  # the population weight a parent sees
    assert merged.meta.senders == ("a", "b")


def test_qffl_by_hand_with_the_step_size_term():
    # h_k = F^q + q L F^(q-1) |d|^2 with q = 1, L = 2: a: 1 + 2*1 = 3, b: 2 + 2*4 = 10
    # e = (1*1 + 2*2) / (3 + 10) = 5 / 13
    ups = [upd("a", [1.0], 1.0, 1.0), upd("b", [2.0], 1.0, 2.0)]
    merged, _ = QFFL({"q": 1.0, "lipschitz": 2.0}).aggregate(ups, None, CTX)
    assert merged.mean()["head.t"]["w"].item() == pytest.approx(5 / 13)


def test_qffl_q_two_on_three_clients_by_hand():
    # L = 0: weights p F^2 = 1*1, 1*4, 2*0.25 = 1, 4, 0.5; e = (1*0 + 4*3 + 0.5*6) / 5.5
    ups = [upd("a", [0.0], 1.0, 1.0), upd("b", [3.0], 1.0, 2.0), upd("c", [6.0], 2.0, 0.5)]
    merged, _ = QFFL({"q": 2.0, "lipschitz": 0.0}).aggregate(ups, None, CTX)
    assert merged.mean()["head.t"]["w"].item() == pytest.approx(15 / 5.5)


def test_qffl_does_not_mutate_its_inputs():
    ups = [upd("a", [1.0], 1.0, 1.0), upd("b", [4.0], 3.0, 3.0)]
    before = [u.tensors["head.t"]["w"].clone() for u in ups]
    QFFL({"q": 2.0}).aggregate(ups, None, CTX)
    assert all(torch.equal(u.tensors["head.t"]["w"], b) for u, b in zip(ups, before))


def test_a_sender_without_a_loss_is_a_clear_error():
    bare = Update.from_delta({"head.t": {"w": torch.ones(1)}}, 1.0, sender="x", round=1)
    with pytest.raises(ValueError, match="x carries no finite 'loss'"):
        QFFL({}).aggregate([bare, upd("a", [1.0], 1.0, 1.0)], None, CTX)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="q"):
        QFFL.check_options({"q": -1}, "topology.default.options")
    with pytest.raises(ConfigError, match="step"):
        AgnosticFL.check_options({"step": float("nan")}, "topology.default.options")


def test_merged_stats_are_the_sample_weighted_mean():
    ups = [upd("a", [1.0], 1.0, 1.0, n=1), upd("b", [4.0], 3.0, 3.0, n=3)]
    assert merge_stats(ups) == {"loss": pytest.approx((1 * 1 + 3 * 3) / 4)}
    assert (ups[0] + ups[1]).meta.stats == {"loss": pytest.approx(2.5)}
    # a statistic one update lacks is dropped, not averaged over the others
    bare = Update.from_delta({"head.t": {"w": torch.ones(1)}}, 1.0, sender="x", round=1)
    assert Update.sum([*ups, bare]).meta.stats == {}


def test_simplex_projection_by_hand():
    assert project_simplex([1.0, 2.0]) == pytest.approx([0.0, 1.0])
    assert project_simplex([0.6, 0.8]) == pytest.approx([0.4, 0.6])
    assert project_simplex([0.2, 0.3, 0.5]) == pytest.approx([0.2, 0.3, 0.5])  # already on it


def test_afl_step_zero_is_the_unweighted_mean_of_senders():
    ups = [upd("a", [1.0], 1.0, 1.0), upd("b", [4.0], 3.0, 3.0)]
    merged, lam = AgnosticFL({"step": 0.0}).aggregate(ups, {}, CTX)
    assert merged.mean()["head.t"]["w"].item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert merged.weights == {"head.t": 4.0}
    assert lam == {"a": 0.5, "b": 0.5}


def test_afl_moves_weight_to_the_lossier_sender_by_hand():
    ups = [upd("a", [1.0], 1.0, 1.0), upd("b", [4.0], 3.0, 3.0)]
    agg = AgnosticFL({"step": 0.1})
    m1, lam = agg.aggregate(ups, agg.init_state(), CTX)
    # round 1 merges uniformly, then lam = proj([0.5 + 0.1, 0.5 + 0.3]) = [0.4, 0.6]
    assert m1.mean()["head.t"]["w"].item() == pytest.approx(2.5)
    assert lam == pytest.approx({"a": 0.4, "b": 0.6})
    m2, lam2 = agg.aggregate(ups, lam, CTX)
    assert m2.mean()["head.t"]["w"].item() == pytest.approx(0.4 * 1 + 0.6 * 4)
    # a newcomer enters at the mean of the others, then all are renormalised
    _, lam3 = AgnosticFL({"step": 0.0}).aggregate([upd("c", [0.0], 1.0, 1.0)], lam, CTX)
    assert lam3 == pytest.approx({"a": 0.4 / 1.5, "b": 0.6 / 1.5, "c": 0.5 / 1.5})


def test_contribution_weighting_drops_a_sender_that_points_against_the_rest():
    from hierfed.aggregators import ContributionWeighted

    ups = [
        upd("a", [1.0, 0.0], 1.0, 1.0),
        upd("b", [1.0, 0.5], 1.0, 1.0),
        upd("c", [-2.0, 0.0], 2.0, 1.0),  # opposes the others
    ]
    merged, rep = ContributionWeighted({"decay": 0.0}).aggregate(ups, {}, CTX)
    # c's cosine with the mean of a and b, [1, 0.25], is -1/sqrt(1.0625): weight 0
    assert rep["c"] == pytest.approx(-1 / (1.0625**0.5))
    # a vs the weighted mean of b and c, (1 * [1, .5] + 2 * [-2, 0]) / 3 = [-3, .5] / 3
    assert rep["a"] == pytest.approx(-3 / (9.25**0.5))
    # b vs ([1, 0] + 2 * [-2, 0]) / 3 = [-1, 0]: cos = -1 / sqrt(1.25)
    assert rep["b"] == pytest.approx(-1 / (1.25**0.5))
    # everyone scores < 0 here: the component falls back to the plain weighted mean
    assert merged.mean()["head.t"]["w"].tolist() == pytest.approx([(1 + 1 - 4) / 4, 0.5 / 4])


def test_contribution_weighting_by_hand_with_one_dissenter():
    from hierfed.aggregators import ContributionWeighted

    ups = [
        upd("a", [1.0, 0.0], 1.0, 1.0),
        upd("b", [1.0, 0.0], 1.0, 1.0),
        upd("c", [1.0, 0.0], 1.0, 1.0),
        upd("d", [-1.0, 0.0], 1.0, 1.0),  # the rest without d: [1, 0]; cos = -1
    ]
    agg = ContributionWeighted({"decay": 0.5})
    merged, rep = agg.aggregate(ups, agg.init_state(), CTX)
    # a without a: (1 + 1 - 1) / 3 > 0: cos = 1; d: cos = -1 -> weight 0
    assert rep == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0, "d": -1.0})
    assert merged.mean()["head.t"]["w"].tolist() == pytest.approx([1.0, 0.0])
    assert merged.weights == {"head.t": 4.0}
    # the reputation is a running mean: d agreeing next round climbs to 0.5 * -1 + 0.5 * 1
    ups2 = [*ups[:3], upd("d", [1.0, 0.0], 1.0, 1.0)]
    _, rep2 = agg.aggregate(ups2, rep, CTX)
    assert rep2["d"] == pytest.approx(0.0)
