"""The membership-inference AUC and the parameter distance, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hierfed.unlearning.verify import auc, auc_lower_is_member, l2_per_component


@pytest.mark.parametrize(
    "members, non_members, want",
    [
        ([0.1, 0.2], [0.3, 0.4], 1.0),  # every member has the lower loss
        ([0.3, 0.4], [0.1, 0.2], 0.0),
        ([0.1, 0.4], [0.2, 0.3], 0.5),  # pairs won: (.1,.2) (.1,.3) -> 2 of 4
        ([0.1, 0.3], [0.2, 0.4], 0.75),  # (.1,.2) (.1,.4) (.3,.4) -> 3 of 4
        ([0.2, 0.3], [0.2], 0.25),  # a tie counts one half: (0.5 + 0) / 2
        ([0.5, 0.5, 0.5], [0.5, 0.5], 0.5),
    ],
)
def test_loss_attack_auc_on_hand_made_losses(members, non_members, want):
    assert auc_lower_is_member(members, non_members) == pytest.approx(want)


def test_auc_of_an_empty_side_is_nan():
    assert math.isnan(auc([], [1.0])) and math.isnan(auc([1.0], []))


@given(
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
    st.lists(st.integers(0, 5), min_size=1, max_size=12),
)
def test_auc_equals_the_pair_count(members, non_members):
    wins = sum((m > n) + 0.5 * (m == n) for m in members for n in non_members)
    assert auc(members, non_members) == pytest.approx(wins / (len(members) * len(non_members)))
    # swapping the sides mirrors it
    assert auc(non_members, members) == pytest.approx(1 - wins / (len(members) * len(non_members)))


def test_l2_per_component_by_hand():
    a = {
        "head.x": {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
        "only.a": {"w": torch.zeros(1)},
    }
    b = {"head.x": {"w": torch.tensor([4.0, 2.0]), "b": torch.tensor([4.0])}}
    assert l2_per_component(a, b) == {"head.x": pytest.approx(5.0)}  # sqrt(3^2 + 4^2)
