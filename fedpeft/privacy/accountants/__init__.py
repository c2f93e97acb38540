"""Privacy accountants, one module each, registered by name (the layout of ``opacus.accountants``).

One small interface (:class:`Accountant`) over well-kept libraries, so that
a client (sample-level DP-SGD) or the server (client-level DP-FedAvg) can
record what it did and ask what it cost::

    acc = create_accountant("rdp")
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
    acc.epsilon(delta=1e-5)          # 1.712
    state = acc.state_dict()         # JSON / Flower ConfigRecord friendly
    create_accountant("rdp", state)  # same history, same epsilon

Registered accountants (all give an upper bound on epsilon), by unit:

sample level (Poisson-sampled examples)
    ``rdp`` (:mod:`.rdp`, opacus), ``prv`` (:mod:`.prv`, opacus),
    ``pld`` (:mod:`.pld`, dp-accounting; add-remove and replace-one).
client level (a fixed number of clients sampled without replacement)
    ``rdp`` (:mod:`.client_level`, dp-accounting; replace-one).

Add one with ``@register_accountant("name")`` on an :class:`Accountant`
subclass that implements ``_epsilon(history, delta)``.
"""

from fedpeft.privacy.accountants.base import RELATIONS, UNITS, Accountant, Segment
from fedpeft.privacy.accountants.client_level import ClientLevelRDPAccountant, client_level_epsilon
from fedpeft.privacy.accountants.pld import PLDAccountant
from fedpeft.privacy.accountants.prv import PRVAccountant, PRVGridTooLarge
from fedpeft.privacy.accountants.rdp import RDPAccountant
from fedpeft.privacy.accountants.registry import (
    accountant_class,
    accountant_title,
    available_accountants,
    check_accountant,
    check_relation,
    compute_epsilon,
    create_accountant,
    register_accountant,
)

__all__ = [
    "Accountant",
    "ClientLevelRDPAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "PRVGridTooLarge",
    "RDPAccountant",
    "RELATIONS",
    "Segment",
    "UNITS",
    "accountant_class",
    "accountant_title",
    "available_accountants",
    "check_accountant",
    "check_relation",
    "client_level_epsilon",
    "compute_epsilon",
    "create_accountant",
    "register_accountant",
]
