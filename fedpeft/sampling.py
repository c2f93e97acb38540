"""Which clients train in a round: the client-sampling schedule.

A leaf module: the server follows the schedule and the DP plan counts it
(:mod:`fedpeft.privacy.plan`), so neither layer imports the other. Without
DP, and under sample-level DP (which claims no amplification by client
sampling), a seeded draw that the server and the DP plan both follow.
Under client-level DP the accountant's amplification by sampling needs a
draw nobody else can repeat: :func:`secret_sample_clients`.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

__all__ = ["sample_clients", "participation", "secret_sample_clients"]


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int, attempt: int = 0) -> list[int]:
    """The clients of one round: a seeded draw without replacement, sorted.

    ``attempt`` > 0 draws the fresh sample of a round run again because too
    few clients answered (``federation.min_clients``).
    """
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round] + ([attempt] if attempt else []))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def participation(num_clients: int, per_round: int, seed: int, num_rounds: int) -> Counter:
    """How many of rounds ``1..num_rounds`` each client is drawn for by :func:`sample_clients`."""
    counts: Counter = Counter({c: 0 for c in range(num_clients)})
    for r in range(1, num_rounds + 1):
        counts.update(sample_clients(num_clients, per_round, seed, r))
    return counts


def secret_sample_clients(num_clients: int, per_round: int, secret, server_round: int, attempt: int = 0) -> list[int]:
    """The clients of one round (try ``attempt``) drawn without replacement from ``secret``
    (a :class:`~fedpeft.privacy.secret.SecretSource`)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = secret.generator("client-sampling", server_round, *([attempt] if attempt else []))
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
