"""A run's DP plan, fixed before the first round: who takes how many private steps, with what noise.

Under sample-level DP client sampling is seeded and public (no amplification
by it is claimed), so the whole participation schedule is known up front.
That lets ``dp.target_epsilon`` be met exactly for the client that spends
the most (the most DP-SGD steps at the largest sampling rate among clients
with that many steps), instead of a bound that assumes every client trains
every round. Under client-level DP the sampling is secret
(:mod:`fedpeft.privacy.secret`) and the plan covers every round.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from fedpeft.errors import ConfigError
from fedpeft.privacy.accountants import accountant_title, client_level_epsilon, compute_epsilon
from fedpeft.privacy.calibration import calibrate_client_noise, calibrate_noise
from fedpeft.privacy.report import PrivacyReport
from fedpeft.privacy.validation import check_delta
from fedpeft.sampling import participation

__all__ = ["DPPlan", "make_dp_plan", "RELATION_TEXT"]

RELATION_TEXT = {
    "sample": "replace-one example of a client's shard (shard sizes are public)",
    "client": "replace-one client",
}
"""How the run folder writes each unit's neighbouring relation."""


@dataclass(frozen=True)
class DPPlan:
    """The mechanism of a DP run and its planned spend.

    Attributes
    ----------
    unit : str
        ``"sample"`` (DP-SGD on each client) or ``"client"`` (central DP).
    accountant : str
        ``dp.accountant``.
    delta : float
        ``dp.delta``.
    noise_multiplier : float
        Sigma used (calibrated when ``target_epsilon`` is set).
    max_grad_norm : float
        Clipping norm (per example, or per client update; the initial norm
        with adaptive clipping).
    target_epsilon : float or None
        The calibration target, if any.
    sample_rates : dict[int, float]
        Sample level: each client's Poisson rate ``batch_size / n_i``. Client
        level: ``{-1: clients_per_round / num_clients}``.
    planned_steps : dict[int, int]
        Sample level: each client's DP-SGD steps over the run. Client level:
        ``{-1: num_rounds}``.
    num_clients, clients_per_round : int
        The federation, for client-level accounting.
    relation : str
        The neighbouring relation the epsilon is for: sample level
        ``"replace-one"`` (a client's shard size is public: it sets the
        aggregation weight and ``q``), client level ``"replace-one"`` client
        (a fixed number of clients is sampled each round).
    local_steps : int
        Sample level: DP-SGD steps a client takes per round (``train.local_steps``).
    """

    unit: str
    accountant: str
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float | None
    sample_rates: dict[int, float]
    planned_steps: dict[int, int]
    num_clients: int
    clients_per_round: int
    relation: str = "replace-one"
    local_steps: int = 0

    def epsilon_after(self, client: int, steps: int) -> float:
        """Epsilon of ``client`` (sample level) or of any client (client level: ``steps`` = rounds)."""
        if self.unit == "client":
            return client_level_epsilon(self.noise_multiplier, self.num_clients, self.clients_per_round, steps,
                                        self.delta)
        if steps == 0:
            return 0.0
        return compute_epsilon(self.noise_multiplier, self.sample_rates[client], steps, self.delta, self.accountant,
                               self.relation)

    def report(self, client: int, steps: int, epsilon: float | None = None) -> PrivacyReport:
        """The guarantee of ``client`` after ``steps`` (client level: ``client = -1``, ``steps`` = rounds).

        ``epsilon`` is the plan's own (:meth:`epsilon_after`) unless given,
        e.g. the largest epsilon the clients' accountants reported (then the
        report carries no history: the plan's would not be the one accounted).
        """
        planned = epsilon is None and steps > 0
        return PrivacyReport(
            unit=self.unit,
            accountant=self.accountant,
            delta=self.delta,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rates[client],
            steps=steps,
            epsilon=self.epsilon_after(client, steps) if epsilon is None else epsilon,
            history=((self.noise_multiplier, self.sample_rates[client], steps),) if planned else (),
            relation=RELATION_TEXT[self.unit],
        )

    def planned_epsilon(self) -> float:
        """The largest epsilon any client reaches if the run completes."""
        return max(self.epsilon_after(c, s) for c, s in self.planned_steps.items())

    def describe(self) -> str:
        """One line for logs and reports."""
        if self.unit == "client":
            how = (f"client-level DP, {self.clients_per_round} of {self.num_clients} clients per round "
                   f"(replace-one, sampled without replacement)")
        else:
            how = "sample-level DP-SGD, Poisson batches (replace-one example; shard sizes public)"
        target = f", calibrated for epsilon <= {self.target_epsilon:g}" if self.target_epsilon else ""
        return (f"{how}: sigma = {self.noise_multiplier:.4g}, C = {self.max_grad_norm:g}, delta = {self.delta:g}, "
                f"{accountant_title(self.accountant)} accountant{target}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sample_rates"] = {str(k): v for k, v in self.sample_rates.items()}
        out["planned_steps"] = {str(k): v for k, v in self.planned_steps.items()}
        return out


def make_dp_plan(cfg, shard_sizes: list[int]) -> DPPlan | None:
    """The DP plan of ``cfg`` for clients with ``shard_sizes`` examples; None without DP.

    Raises
    ------
    fedpeft.errors.ConfigError
        If delta is not below 1 / records of the unit, or the target epsilon
        cannot be reached.
    """
    dp, fed = cfg.dp, cfg.federation
    if dp.mode == "none":
        return None
    target = dp.target_epsilon or None
    m, n = cfg.clients_per_round, fed.num_clients
    if dp.mode == "client":
        check_delta(dp.delta, n)
        sigma = (calibrate_client_noise(target, dp.delta, n, m, fed.num_rounds) if target else dp.noise_multiplier)
        if dp.clipping == "adaptive":
            _check_count_noise(sigma, dp.clipped_count_stddev or m / 20)
        return DPPlan("client", dp.accountant, dp.delta, sigma, dp.max_grad_norm, target, {-1: m / n},
                      {-1: fed.num_rounds}, n, m)
    check_delta(dp.delta, max(shard_sizes))
    rounds = participation(n, m, fed.seed, fed.num_rounds)
    # A client with no examples is skipped when sampled: it takes no steps (and has no rate to speak of).
    rates = {c: min(1.0, cfg.train.batch_size / size) if size else 0.0 for c, size in enumerate(shard_sizes)}
    steps = {c: cfg.train.local_steps * rounds[c] if shard_sizes[c] else 0 for c in range(n)}
    sigma = dp.noise_multiplier
    if target:
        # The noise a client needs grows with its rate: per step count, only the largest rate matters.
        worst: dict[int, float] = {}
        for c in range(n):
            if steps[c]:
                worst[steps[c]] = max(worst.get(steps[c], 0.0), rates[c])
        sigma = max(_calibrated(target, dp.delta, q, k, dp.accountant) for k, q in worst.items())
    return DPPlan("sample", dp.accountant, dp.delta, sigma, dp.max_grad_norm, target, rates, steps, n, m,
                  local_steps=cfg.train.local_steps)


def _check_count_noise(sigma: float, count_stddev: float) -> None:
    """Adaptive clipping spends part of sigma on the clipped-count query (Andrew et al. 2021):
    ``sigma_update^-2 + (2 count_stddev)^-2 = sigma^-2`` needs ``count_stddev > sigma / 2``."""
    if sigma >= 2 * count_stddev:
        raise ConfigError(
            f"dp.clipped_count_stddev = {count_stddev:g} (0 means clients per round / 20) is too small for adaptive "
            f"clipping at noise multiplier {sigma:.4g}: it must exceed sigma / 2 = {sigma / 2:.4g}; raise it, or use "
            "dp.clipping = 'fixed'"
        )


@lru_cache(maxsize=1024)
def _calibrated(target: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    # Clients with the same shard size and participation share one search.
    return calibrate_noise(target, delta, rate, steps, accountant, relation="replace-one")
