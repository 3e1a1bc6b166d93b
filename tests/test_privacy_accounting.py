"""Privacy accounting: pinned Opacus RDP values, continuity across rounds, policies, config checks."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from hierfed.config import load_config
from hierfed.data.federation import ClientProfile
from hierfed.errors import ConfigError
from hierfed.privacy.accountant import PrivacyState, client_level_report, epsilon_of
from hierfed.privacy.policy import plan_for, policy_name
from tests.conftest import tiny_overrides


def test_epsilon_matches_opacus_on_pinned_case():
    # sigma = 1.5, q = 0.04, 2,250 steps, delta = 1e-5: Opacus RDP gives epsilon ~= 7.3291
    s = PrivacyState.empty("p", 1e-5).after(((1.5, 0.04, 2250),))
    ref = RDPAccountant()
    for _ in range(2250):
        ref.step(noise_multiplier=1.5, sample_rate=0.04)
    assert s.epsilon == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    assert s.epsilon == pytest.approx(7.3291, abs=5e-5)


def test_epsilon_is_continuous_across_rounds():
    # 9 participations of 250 steps: each round's epsilon equals one accountant run over all
    # steps so far (never a fresh per-round epsilon), rising to the pinned total
    s = PrivacyState.empty("p", 1e-5)
    prev = 0.0
    for r in range(1, 10):
        s = s.after(((1.5, 0.04, 250),))
        assert s.history == ((1.5, 0.04, 250 * r),)
        assert s.epsilon == pytest.approx(epsilon_of(((1.5, 0.04, 250 * r),), 1e-5), rel=1e-12)
        assert s.epsilon > prev
        prev = s.epsilon
    assert s.participations == 9
    assert s.epsilon == pytest.approx(7.3291, abs=5e-5)
    # a per-round report would have said far less: the cumulative value is what we report
    assert epsilon_of(((1.5, 0.04, 250),), 1e-5) < 0.5 * s.epsilon


def test_derived_noise_fits_the_budget_and_modalities_tighten_it():
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "rounds": 4,
                "privacy.policies.strict.epsilon": 1.0,
                "privacy.policies.strict.modalities.image": 0.5,
                "privacy.policies.loose.epsilon": 10.0,
                "privacy.assign.global/inst-00/*": "strict",
                "privacy.default": "loose",
            }
        ),
    )
    tiers = ("global", "institution", "student")
    img = ClientProfile(
        "global/inst-00/student-000", ("image", "tabular"), ("digit", "dropout_risk"), 40, 10
    )
    txt = ClientProfile("global/inst-00/student-001", ("tabular",), ("dropout_risk",), 40, 10)
    other = ClientProfile("global/inst-01/student-000", ("tabular",), ("dropout_risk",), 40, 10)
    assert (policy_name(cfg, img), policy_name(cfg, other)) == ("strict", "loose")
    p_img, p_txt = plan_for(cfg, img, 40, tiers), plan_for(cfg, txt, 40, tiers)
    assert (p_img.epsilon, p_txt.epsilon) == (0.5, 1.0)
    # q = 16 / 40; steps per participation = epochs x tasks x ceil(1 / q) = 1 x 2 x 3
    assert (
        p_img.sample_rate == pytest.approx(0.4)
        and p_img.steps_per_round == 6
        and p_img.planned_rounds == 4
    )
    eps = epsilon_of(((p_img.noise_multiplier, 0.4, 6 * 4),), 1e-5)
    assert 0.5 - 0.01 <= eps <= 0.5
    assert p_img.noise_multiplier > p_txt.noise_multiplier > 0
    none = load_config(None, tiny_overrides())
    assert plan_for(none, img, 40, tiers) is None


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("privacy.policies.p.noise_multiplier", -1.0, "noise_multiplier"),
        ("privacy.policies.p.noise_multiplier", "nan", "noise_multiplier"),
        ("privacy.policies.p.delta", 1.0, "delta"),
        ("privacy.policies.p.delta", 0.0, "delta"),
        ("privacy.policies.p.epsilon", "nan", "epsilon"),
        ("privacy.policies.p.clip_norm", 0.0, "clip_norm"),
        (
            "topology.tiers.institution.postprocess_options.gaussian.noise_multiplier",
            -0.5,
            "noise_multiplier",
        ),
        (
            "topology.tiers.institution.postprocess_options.gaussian.noise_multiplier",
            "nan",
            "noise_multiplier",
        ),
        ("topology.tiers.institution.postprocess_options.gaussian.delta", 1.5, "delta"),
    ],
)
def test_bad_dp_settings_fail_at_start_up(key, value, match):
    extra = {key: value}
    if key.startswith("topology"):
        extra["topology.tiers.institution.postprocess"] = "[gaussian]"
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, tiny_overrides(**extra))
    assert key in str(err.value)


def test_unknown_policy_names_are_config_errors():
    with pytest.raises(ConfigError, match="privacy.default.*no such policy"):
        load_config(None, tiny_overrides(**{"privacy.default": "gdpr"}))
    with pytest.raises(ConfigError, match="no such policy"):
        load_config(None, tiny_overrides(**{"privacy.assign.global/*": "gdpr"}))


def test_client_level_report_states_unit_and_rate():
    cfg = load_config(
        None,
        tiny_overrides(
            **{
                "topology.tiers.institution.postprocess": "[gaussian]",
                "topology.tiers.institution.postprocess_options.gaussian.noise_multiplier": 1.5,
                "topology.tiers.institution.participation": 0.04,
                "topology.tiers.institution.local_rounds": 3,
            }
        ),
    )
    rep = client_level_report(cfg, ("global", "institution", "student"), 750)
    assert set(rep) == {"institution"}
    r = rep["institution"]
    assert (r["unit"], r["level"], r["steps"], r["sample_rate"]) == (
        "student",
        "client",
        2250,
        0.04,
    )
    assert r["epsilon"] == pytest.approx(7.3291, abs=5e-5)
    assert (
        client_level_report(cfg, ("global", "institution", "student"), 0)["institution"]["epsilon"]
        == 0.0
    )


def test_accountant_state_survives_a_checkpoint_round_trip():
    # the state is carried in run checkpoints (engine.privacy): no pickle, exact values back
    import json

    from hierfed.checkpoint import pack, unpack

    s = PrivacyState.empty("p", 1e-5, 3.0).after(((1.2, 0.5, 8),)).spent()
    tensors: dict = {}
    back = unpack(json.loads(json.dumps(pack({"global/inst-00/student-000": s}, tensors))), tensors)
    assert back["global/inst-00/student-000"] == s
    assert (
        back["global/inst-00/student-000"].after(((1.2, 0.5, 8),)).epsilon
        == s.after(((1.2, 0.5, 8),)).epsilon
    )


@pytest.mark.parametrize(
    "gossip, edge, unit",
    [
        ({"topology.tiers.student.peer_steps": 1}, "institution", "student"),  # students, D2D
        ({"topology.tiers.institution.peer_steps": 1}, "global", "institution"),  # inner tier
    ],
)
def test_client_level_report_claims_no_bound_where_the_senders_gossip(gossip, edge, unit):
    """Senders that mix with each other exchange un-noised values, and each update sent up
    carries neighbours' data: the per-sender accounting does not hold, so the report must
    say epsilon = inf and why, not print the bound it computes without gossip."""
    base = {
        f"topology.tiers.{edge}.postprocess": "[gaussian]",
        f"topology.tiers.{edge}.postprocess_options.gaussian.noise_multiplier": 1.5,
    }
    tiers = ("global", "institution", "student")
    plain = client_level_report(load_config(None, tiny_overrides(**base)), tiers, 3)
    assert math.isfinite(plain[edge]["epsilon"]) and "not_covered" not in plain[edge]
    cfg = load_config(None, tiny_overrides(**base, **gossip))
    rep = client_level_report(cfg, tiers, 3)[edge]
    assert rep["epsilon"] == math.inf and rep["unit"] == unit
    assert "gossip" in rep["not_covered"] and "peer_steps" in rep["not_covered"]
    # gossip in another tier leaves this edge's bound alone
    other = (
        {"topology.tiers.institution.peer_steps": 1}
        if unit == "student"
        else {"topology.tiers.student.peer_steps": 1}
    )
    rep2 = client_level_report(load_config(None, tiny_overrides(**base, **other)), tiers, 3)
    assert rep2[edge]["epsilon"] == plain[edge]["epsilon"]


def test_deriving_the_noise_is_quiet_and_the_same_as_opacus(caplog):
    """The largest-alpha warning came from the search's probes (sigma 20, 10, ...), never
    from the answer: silenced, the answer is Opacus's bit for bit and its order is interior."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    from hierfed.privacy.policy import _check_order, _derive_sigma

    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        reference = get_noise_multiplier(
            target_epsilon=1.0,
            target_delta=1e-5,
            sample_rate=0.01,
            steps=1000,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    assert any("largest alpha" in str(w.message) for w in loud)  # Opacus alone warns
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        sigma = _derive_sigma.__wrapped__(1.0, 1e-5, 0.01, 1000)
    assert sigma == reference
    assert not [w for w in quiet if "largest alpha" in str(w.message)]
    assert _check_order(sigma, 0.01, 1000, 1e-5) == 17.0
    assert not caplog.records
    # a plan whose bound does sit at the largest order is logged, in one line
    with caplog.at_level("WARNING", logger="hierfed.privacy.policy"):
        assert _check_order(20.0, 0.01, 1000, 1e-5) == 63.0
    assert "largest RDP order" in caplog.text
