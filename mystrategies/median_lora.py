"""A user-written rule: the coordinate-wise median of the clients' full updates."""

from dataclasses import dataclass

import numpy as np

import strategies
from strategies import LoRAFactors


@strategies.register("median-lora")
@dataclass
class MedianLoRA(strategies.Strategy):
    """Median LoRA: coordinate-wise median of the clients' updates B_i A_i, re-factorised to rank r."""

    exact = False
    trim_rank: int = 0  # rank of the new factors (0 = keep the current rank)

    def aggregate_factors(self, state, updates, weights):
        factors = dict(state.factors)
        for m, old in state.factors.items():
            deltas = np.stack([u.factors[m].delta(np.float64) for u in updates if m in u.factors])
            median = np.median(deltas, axis=0)  # robust to a few outlying clients
            r = self.trim_rank or old.rank
            u, s, vt = np.linalg.svd(median, full_matrices=False)
            B = (u[:, :r] * np.sqrt(s[:r]) / np.sqrt(old.scaling)).astype(np.float32)
            A = (np.sqrt(s[:r])[:, None] * vt[:r] / np.sqrt(old.scaling)).astype(np.float32)
            factors[m] = LoRAFactors(A=A, B=B, scaling=old.scaling)
        return state.replace(factors=factors)
