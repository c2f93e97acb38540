"""FedIT: average the LoRA factors A and B separately."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState
from .utils import weighted_sum

__all__ = ["FedIT"]


@register("fedit")
@dataclass
class FedIT(Strategy):
    """FedIT: average A and B separately, weighted by examples (inexact).

    Zhang et al., "Towards Building the Federated GPT: Federated Instruction
    Tuning" (2023), as in FlowerTune and OpenFedLLM: FedAvg applied to each
    LoRA factor on its own,

        A = sum_i p_i A_i,    s B = sum_i p_i s_i B_i,    p_i = n_i / sum_j n_j

    (with equal scalings ``s_i = s`` this is just ``B = sum_i p_i B_i``).
    Extra tensors are averaged with the same weights.

    The product of averages is not the average of products, so the global
    update misses the clients' mean update by a covariance term:

        sum_i p_i s_i B_i A_i - s B A = sum_i p_i (s_i B_i - s B)(A_i - A)
                                      = s sum_i p_i (B_i - B)(A_i - A)   (equal s)

    It vanishes when clients agree on A (FFA-LoRA) or on B; FedEx-LoRA folds
    it into the base weight as a residual. Clients must share one rank.
    """

    client_dp_unsafe = None  # the global arrays are the uniform mean of the uploads

    exact = False

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors = dict(state.factors)  # modules no client sent keep their value
        for m, old, fs, p in self.module_updates(state, updates, weights):
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            A = weighted_sum([f.A for f in fs], p)
            # fold each client's scaling into B, so that s * B = sum_i p_i s_i B_i
            B = weighted_sum([f.B for f in fs], [pi * f.scaling / s for pi, f in zip(p, fs)])
            factors[m] = LoRAFactors(A, B, s)
        return state.replace(factors=factors)
