"""Client-level ``rdp``: dp-accounting's RDP for a fixed number of clients sampled without replacement.

Each round of client-level DP (``dp.mode = "client"``) releases
``mean of m clipped uploads + N(0, (sigma C / m)^2)`` with ``m`` of the
``N`` clients drawn without replacement. Under the *replace one client*
relation a clipped update moves the mean by up to ``2 C / m``: a Gaussian
with noise multiplier ``sigma / 2`` relative to that sensitivity, amplified
by sampling without replacement (Wang, Balle and Kasiviswanathan 2019, in
Google's dp-accounting RDP accountant). With adaptive clipping, ``sigma`` is
the total noise multiplier of the update and the clipped-count query
together (Flower splits it, Andrew et al. 2021), so the same number applies.
"""

from __future__ import annotations

import logging
import math

from fedpeft.privacy.accountants.base import Accountant, Segment
from fedpeft.privacy.accountants.registry import create_accountant, register_accountant

__all__ = ["ClientLevelRDPAccountant", "client_level_epsilon"]


@register_accountant("rdp")
class ClientLevelRDPAccountant(Accountant):
    """Rounds of the central Gaussian mechanism over ``clients_per_round`` of ``num_clients`` clients.

    Parameters
    ----------
    relation : {"replace-one"}
        The only relation a fixed-size sample accounts.
    num_clients : int
        ``N``, the clients sampled from.
    clients_per_round : int
        ``m``, drawn without replacement each round; every step's
        ``sample_rate`` must be ``m / N``.
    """

    title = "RDP"
    unit = "client"
    relations = ("replace-one",)

    def __init__(self, relation: str = "replace-one", *, num_clients: int, clients_per_round: int) -> None:
        super().__init__(relation)
        for key, value in (("num_clients", num_clients), ("clients_per_round", clients_per_round)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if clients_per_round > num_clients:
            raise ValueError(f"clients_per_round = {clients_per_round} exceeds num_clients = {num_clients}")
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round

    @property
    def sample_rate(self) -> float:
        """Each client's chance to be drawn in a round, ``m / N``."""
        return self.clients_per_round / self.num_clients

    def _check_sample_rate(self, q: float) -> float:
        if not math.isclose(q, self.sample_rate, rel_tol=1e-12):
            raise ValueError(f"a client-level step samples {self.clients_per_round} of {self.num_clients} clients "
                             f"(rate {self.sample_rate:g}), not at rate {q:g}")
        return q

    def _settings(self) -> tuple:
        return (self.num_clients, self.clients_per_round)

    def _epsilon(self, history: list[Segment], delta: float) -> float:
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        for sigma, _, rounds in history:
            event = dp_accounting.GaussianDpEvent(sigma / 2.0)  # replace-one doubles the sensitivity
            if self.clients_per_round < self.num_clients:
                event = dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.clients_per_round, event)
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(rounds)))
        absl = logging.getLogger("absl")  # it warns for every order it drops as not converging
        level = absl.level
        absl.setLevel(logging.ERROR)
        try:
            return float(accountant.get_epsilon(delta))
        finally:
            absl.setLevel(level)


def client_level_epsilon(noise_multiplier: float, num_clients: int, clients_per_round: int, rounds: int,
                         delta: float) -> float:
    """Epsilon (client unit, replace-one relation) after ``rounds`` noised aggregates.

    Parameters
    ----------
    noise_multiplier : float
        Sigma of every round (0 gives ``inf``).
    num_clients, clients_per_round : int
        ``N`` and ``m``.
    rounds : int
        Rounds so far (0 gives 0.0).
    delta : float
        ``dp.delta``.
    """
    acc = create_accountant("rdp", relation="replace-one", unit="client", num_clients=num_clients,
                            clients_per_round=clients_per_round)
    return acc.step(noise_multiplier, clients_per_round / num_clients, rounds).epsilon(delta)
