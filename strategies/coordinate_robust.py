"""What the coordinate-wise robust rules share: a statistic of each client's full adapted update, made exact again.

A Byzantine client can send any factors. A rule that averages factors (FedIT)
lets one such client move the global adapter as far as it likes; a
coordinate-wise median or trimmed mean of the clients' updates cannot be
moved past the range the honest clients span (for fewer hostile than honest
clients). The statistic is taken of each client's effective update, the
dense ``residual + s_i B_i A_i`` it trained (not of A and B separately,
whose products a coordinate-wise statistic would not respect), then split
back into rank-``r`` factors by SVD for the clients, with the remainder
folded into the frozen base as a residual, as FedEx-LoRA does: the model the
clients get next round is exactly ``W0 + statistic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Strategy
from .flexlora import svd_factors
from .state import ClientUpdate, ServerState

__all__ = ["CoordinateRobust"]


@dataclass
class CoordinateRobust(Strategy):
    """Base of the coordinate-wise robust rules: subclasses define :meth:`statistic` over clients (axis 0)."""

    client_dp_unsafe = (
        "a median or trimmed mean is not the mean whose sensitivity (clip / clients) client-level DP calibrates its "
        "noise to, and its residual is built from the clients' clipped factors and sent without noise"
    )
    # Not the weighted mean ``exact`` promises: the clients' next model is exactly W0 + the statistic instead.
    exact = False

    def statistic(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement statistic")

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors, residuals = dict(state.factors), dict(state.residuals)
        for m, old, fs, _ in self.module_updates(state, updates, weights):
            if old.scaling <= 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling {old.scaling}; it needs > 0")
            base = state.residuals[m].astype(np.float64) if m in state.residuals else 0.0
            target = self.statistic(np.stack([base + f.delta(np.float64) for f in fs]))
            U, S, Vt = np.linalg.svd(target, full_matrices=False)
            dtype = np.result_type(old.A, old.B, *[a for f in fs for a in (f.A, f.B)])
            factors[m] = svd_factors(U, S, Vt, old.rank, old.scaling, dtype)
            residuals[m] = (target - factors[m].delta(np.float64)).astype(dtype)
        return state.replace(factors=factors, residuals=residuals)

    def aggregate_extras(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        extras = dict(state.extras)
        for name, old in state.extras.items():
            sent = [u.extras[name].astype(np.float64) for u in updates if name in u.extras]
            if sent:
                extras[name] = self.statistic(np.stack(sent)).astype(old.dtype)
        return extras
