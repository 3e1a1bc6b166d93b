"""Differential privacy: sample-level DP-SGD with Opacus, persistent per-client accountants,
budget policies, and client-level DP (the ``gaussian`` postprocessor) at any tier."""

from hierfed.privacy.accountant import PrivacyState, client_level_report, epsilon_of
from hierfed.privacy.gaussian import GaussianMechanism
from hierfed.privacy.policy import DPPlan, check_privacy_config, plan_for, policy_name

__all__ = [
    "DPPlan",
    "GaussianMechanism",
    "PrivacyState",
    "check_privacy_config",
    "client_level_report",
    "epsilon_of",
    "plan_for",
    "policy_name",
]
