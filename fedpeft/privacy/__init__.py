"""Differential privacy for fedpeft: accounting, noise calibration and reports.

Every privacy number names its unit (sample or client), its accountant and its
delta: see :class:`PrivacyReport`.
"""

from fedpeft.privacy.accounting import (
    Accountant,
    PLDAccountant,
    PRVAccountant,
    PRVGridTooLarge,
    RDPAccountant,
    Segment,
    accountant_title,
    available_accountants,
    check_accountant,
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
    compute_epsilon,
    create_accountant,
    register_accountant,
)
from fedpeft.privacy.calibration import calibrate_noise
from fedpeft.privacy.report import UNITS, PrivacyReport

__all__ = [
    "Accountant",
    "PLDAccountant",
    "PRVAccountant",
    "PRVGridTooLarge",
    "PrivacyReport",
    "RDPAccountant",
    "Segment",
    "UNITS",
    "accountant_title",
    "available_accountants",
    "calibrate_noise",
    "check_accountant",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "check_target_epsilon",
    "compute_epsilon",
    "create_accountant",
    "register_accountant",
]
