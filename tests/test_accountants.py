"""The accountants package: client-level accounting is an accountant like the others, and each
accountant lives in its unit's registry."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting import rdp as dpa_rdp

from fedpeft.errors import ConfigError
from fedpeft.privacy.accountants import (
    ClientLevelRDPAccountant,
    PLDAccountant,
    RDPAccountant,
    available_accountants,
    client_level_epsilon,
    create_accountant,
)

DELTA = 1e-4


def reference(segments, num_clients, per_round, delta=DELTA):
    """dp-accounting directly: replace-one, sensitivity 2C/m, m of N without replacement."""
    acc = dpa_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, rounds in segments:
        event = dp_accounting.SampledWithoutReplacementDpEvent(num_clients, per_round,
                                                               dp_accounting.GaussianDpEvent(sigma / 2.0))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


def client(n=20, m=5):
    return create_accountant("rdp", relation="replace-one", unit="client", num_clients=n, clients_per_round=m)


def test_client_level_rdp_is_registered_for_the_client_unit_only():
    assert available_accountants("client") == ["rdp"]
    assert isinstance(client(), ClientLevelRDPAccountant)
    assert isinstance(create_accountant("rdp"), RDPAccountant)  # the sample-level name is unchanged
    with pytest.raises(ConfigError, match=r"dp.accountant = 'pld' is not valid; choose one of: rdp"):
        create_accountant("pld", unit="client", num_clients=4, clients_per_round=2)
    with pytest.raises(ConfigError, match="cannot account the add-remove relation"):
        create_accountant("rdp", relation="add-remove", unit="client", num_clients=4, clients_per_round=2)


def test_client_level_epsilon_equals_dp_accounting_exactly():
    assert client_level_epsilon(1.2, 20, 5, 7, DELTA) == reference([(1.2, 7)], 20, 5)
    acc = client().step(1.2, 5 / 20, 7).step(0.9, 5 / 20, 3)  # two stretches of rounds compose
    assert acc.history == ((1.2, 0.25, 7), (0.9, 0.25, 3))
    assert acc.epsilon(DELTA) == reference([(1.2, 7), (0.9, 3)], 20, 5)
    assert reference([(1.2, 7)], 20, 5) < acc.epsilon(DELTA)


def test_client_level_accountant_without_sampling_or_noise():
    full = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(0.5), 4)  # every client, every round
    want = dpa_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).compose(full)
    assert client_level_epsilon(1.0, 6, 6, 4, DELTA) == want.get_epsilon(DELTA)
    assert client_level_epsilon(0.0, 6, 3, 4, DELTA) == float("inf")
    assert client_level_epsilon(1.0, 6, 3, 0, DELTA) == 0.0


def test_client_level_state_round_trips_and_refuses_another_rate():
    acc = client().step(1.1, 0.25, 4)
    restored = create_accountant("rdp", acc.state_dict(), "replace-one", unit="client", num_clients=20,
                                 clients_per_round=5)
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    copy = acc.copy().step(1.1, 0.25, 1)
    assert (copy.num_clients, copy.clients_per_round, copy.steps, acc.steps) == (20, 5, 5, 4)
    with pytest.raises(ValueError, match="5 of 20 clients"):
        client().step(1.0, 0.3, 1)
    with pytest.raises(ValueError, match="5 of 10 clients"):
        create_accountant("rdp", acc.state_dict(), "replace-one", unit="client", num_clients=10, clients_per_round=5)
    with pytest.raises(ValueError, match="exceeds"):
        client(n=3, m=5)


def test_same_name_in_two_units_are_different_classes():
    assert PLDAccountant.unit == "sample" and ClientLevelRDPAccountant.unit == "client"
    assert ClientLevelRDPAccountant.name == RDPAccountant.name == "rdp"
