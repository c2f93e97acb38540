"""Differential privacy for fedpeft, laid out like opacus.

* :mod:`fedpeft.privacy.accountants`: what a history of noisy steps costs
  (``rdp``, ``prv``, ``pld`` at the sample level; ``rdp`` at the client level),
  registered by name.
* :mod:`fedpeft.privacy.validation`: checks of privacy inputs and of ``[dp]``.
* :mod:`fedpeft.privacy.calibration`: the noise that meets a target epsilon.
* :mod:`fedpeft.privacy.plan`: a run's mechanism and planned spend.
* :mod:`fedpeft.privacy.dp_sgd`, :mod:`fedpeft.privacy.client_level`: the
  mechanisms (opacus DP-SGD on a client, Flower's central-DP wrappers).
* :mod:`fedpeft.privacy.secret`: where the protecting randomness comes from.

Every privacy number names its unit (sample or client), its accountant, its
delta and its relation: see :class:`PrivacyReport`.
"""

from fedpeft.privacy.accountants import (
    RELATIONS,
    UNITS,
    Accountant,
    ClientLevelRDPAccountant,
    PLDAccountant,
    PRVAccountant,
    PRVGridTooLarge,
    RDPAccountant,
    Segment,
    accountant_title,
    available_accountants,
    check_accountant,
    client_level_epsilon,
    compute_epsilon,
    create_accountant,
    register_accountant,
)
from fedpeft.privacy.calibration import calibrate_client_noise, calibrate_noise
from fedpeft.privacy.report import PrivacyReport
from fedpeft.privacy.validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
    check_target_epsilon,
)

__all__ = [
    "Accountant",
    "ClientLevelRDPAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "PRVGridTooLarge",
    "PrivacyReport",
    "RDPAccountant",
    "RELATIONS",
    "Segment",
    "UNITS",
    "accountant_title",
    "available_accountants",
    "calibrate_client_noise",
    "calibrate_noise",
    "check_accountant",
    "check_delta",
    "check_noise_multiplier",
    "check_sample_rate",
    "check_steps",
    "check_target_epsilon",
    "client_level_epsilon",
    "compute_epsilon",
    "create_accountant",
    "register_accountant",
]
