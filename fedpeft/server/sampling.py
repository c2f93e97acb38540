"""Which clients train in a round: a seeded draw the server and the DP plan both follow."""

from __future__ import annotations

import numpy as np


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """The clients of one round: a seeded draw without replacement, sorted."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
