"""FlexLoRA: average the clients' full low-rank updates, then truncate the
sum's SVD back to each client's rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .hetlora import RankTruncating
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState
from .utils import complete_rows, lowrank_svd

__all__ = ["FlexLoRA", "svd_factors"]


def svd_factors(
    U: np.ndarray, S: np.ndarray, Vt: np.ndarray, rank: int, scaling: float, dtype
) -> LoRAFactors:
    """Rank-``rank`` factors with ``scaling * B @ A = U_r diag(S_r) Vt_r``:
    ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) Vt_r`` (sqrt(S) split over
    both factors, ``s`` folded in).

    A component whose singular value is 0 (to float precision), or that does
    not exist because the update has lower rank, gets a unit-norm row of A
    orthogonal to the others and a zero column of B, like a fresh LoRA
    component (B = 0), so that clients can still train it; a zero row in both
    would get zero gradients forever.
    """
    if scaling <= 0:
        raise ValueError(f"scaling must be > 0 to split an SVD into LoRA factors, got {scaling}")
    d_out, d_in = U.shape[0], Vt.shape[1]
    q = min(rank, len(S))
    tol = (S[0] if len(S) else 0.0) * max(d_out, d_in) * np.finfo(np.float64).eps
    live = int(np.count_nonzero(S[:q] > tol))
    root = np.sqrt(S[:live] / scaling)
    B = np.zeros((d_out, rank))
    B[:, :live] = U[:, :live] * root
    A = complete_rows(Vt[:live], rank)  # unit rows for the dead components
    A[:live] *= root[:, None]
    return LoRAFactors(A.astype(dtype), B.astype(dtype), scaling)


@register("flexlora")
@dataclass
class FlexLoRA(RankTruncating):
    """FlexLoRA: average full client updates, SVD-truncate to each client's rank (exact up to truncation).

    Bai et al., "Federated Fine-tuning of Large Language Models under
    Heterogeneous Tasks and Client Resources" (NeurIPS 2024). Clients train
    adapters of different ranks ``r_i``; the server forms the exact weighted
    mean of their full updates,

        dW = sum_i p_i s_i B_i A_i,        p_i = n_i / sum_j n_j

    (computed from the factors: QR of the stacked factors and an SVD of a
    small core, never a dense average of ``d_out x d_in`` matrices), takes its
    SVD ``dW = U S V^T`` and keeps the top ``R`` components as the global
    factors, ``R`` the largest client rank: ``B = U_R sqrt(S_R / s)``,
    ``A = sqrt(S_R / s) V_R^T`` with the server's scaling ``s``, so
    ``s B A`` is the best rank-``R`` approximation of ``dW``. A client of rank
    ``r`` is sent the first ``r`` components, the best rank-``r``
    approximation. Residuals (none of its own) are carried over.

    Exact when ``R >= rank(dW)`` (e.g. ``R >= sum_i r_i``); otherwise the
    error ``||dW - s B A||_F^2`` is the sum of the dropped ``S_j^2``. Unused
    components (``S_j = 0``) get an orthonormal row of A and a zero column of
    B so they stay trainable.
    """

    client_dp_unsafe = (
        "its SVD truncation runs before the noise, and one client can move the truncated factors by more than clip / clients"
    )

    exact = False

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors = dict(state.factors)
        for m, old, fs, p in self.module_updates(state, updates, weights):
            s = old.scaling
            if s <= 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling {s}; FlexLoRA needs > 0")
            R = max([old.rank] + [f.rank for f in fs])
            dtype = np.result_type(old.A, old.B, *[a for f in fs for a in (f.A, f.B)])
            Bcat = np.concatenate([pi * f.scaling * f.B.astype(np.float64) for pi, f in zip(p, fs)], axis=1)
            Acat = np.concatenate([f.A.astype(np.float64) for f in fs], axis=0)
            U, S, Vt = lowrank_svd(Bcat, Acat)
            factors[m] = svd_factors(U, S, Vt, R, s, dtype)
        ranks = {u.client_id: max((f.rank for f in u.factors.values()), default=0) for u in updates}
        new = state.replace(factors=factors, meta=self._ranks_after(state, ranks))
        return self._with_truncations(new)
