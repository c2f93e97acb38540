"""FedEx-LoRA: FedIT averaging plus the exact residual folded into the base weight."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .fedit import FedIT
from .registry import register
from .state import ClientUpdate, ServerState

__all__ = ["FedExLoRA"]


@register("fedex-lora")
@dataclass
class FedExLoRA(FedIT):
    """FedEx-LoRA: averaged factors plus the exact residual folded into the frozen base (exact).

    Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient
    Fine-Tuning of Foundation Models" (2024). The factors are averaged as in
    FedIT (``A = sum_i p_i A_i``, ``s B = sum_i p_i s_i B_i``), and the
    error that averaging makes,

        R_t = sum_i p_i s_i B_i A_i - s B A      (dense, d_out x d_in),

    is added to the frozen base weight, so that the model clients use next
    round is exactly ``W0 + residual_before + sum_i p_i s_i B_i A_i``.

    ``state.residuals[m]`` is absolute, the running total of ``R_t`` since
    round 0, and is part of every client's payload (dense ``d_out x d_in``,
    counted in the download bytes): a client sets its base weight to
    ``W0 + residual`` (not ``+=``), so it needs no memory between rounds. The
    paper sends each round's increment to stateful clients instead; the dense
    size per round is the same. Uploads are the same as FedIT's (A, B, extras).
    Clients must share one rank.
    """

    client_dp_unsafe = (
        "its residual sum_i p_i B_i A_i - B A is built from each client's clipped factors and sent without noise"
    )

    exact = True

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        new = super().aggregate_factors(state, updates, weights)
        residuals = dict(state.residuals)
        for m, _, fs, p in self.module_updates(state, updates, weights):
            exact = sum(pi * fi.delta(np.float64) for pi, fi in zip(p, fs))
            increment = exact - new.factors[m].delta(np.float64)  # with the averaged factors as stored
            old = state.residuals.get(m)
            f = new.factors[m]
            dtype = np.result_type(f.A, f.B, *(fi.A for fi in fs), *(fi.B for fi in fs))
            if old is not None:
                dtype = np.result_type(dtype, old)
                increment = increment + old.astype(np.float64)
            residuals[m] = increment.astype(dtype)
        return new.replace(residuals=residuals)
