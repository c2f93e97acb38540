"""Which clients train in a round.

Without DP, and under sample-level DP (which claims no amplification by
client sampling), a seeded draw that the server and the DP plan both follow.
Under client-level DP the accountant's amplification by sampling needs a
draw nobody else can repeat: :func:`secret_sample_clients`.
"""

from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """The clients of one round: a seeded draw without replacement, sorted."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def secret_sample_clients(num_clients: int, per_round: int, secret, server_round: int) -> list[int]:
    """The clients of one round drawn without replacement from ``secret`` (a :class:`~fedpeft.privacy.secret.SecretSource`)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = secret.generator("client-sampling", server_round)
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
