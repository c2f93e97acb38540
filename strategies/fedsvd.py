"""FedSVD: train and send B only; the server re-factorises the global update by
SVD so that A always has orthonormal rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState
from .utils import complete_rows, lowrank_svd, normalise, weighted_sum

__all__ = ["FedSVD", "refactorise"]


def refactorise(f: LoRAFactors, dtype=None) -> LoRAFactors:
    """Same product, orthonormal A: ``s B A = U S V^T`` (thin SVD, rank r),
    ``A = V_r^T``, ``B = U_r S_r / s``, so ``s * B' @ A' == s * B @ A`` to
    float precision. Where ``B A`` has rank below ``r`` the missing rows of A
    are an orthonormal completion and the matching columns of B are 0 (rows
    run out only if ``r > d_in``: those stay 0)."""
    s = f.scaling
    if s == 0:
        raise ValueError("cannot re-factorise LoRA factors with scaling 0")
    dtype = dtype or np.result_type(f.A, f.B)
    r = f.rank
    U, S, Vt = lowrank_svd(s * f.B.astype(np.float64), f.A)
    q = min(r, len(S))
    B = np.zeros((f.B.shape[0], r))
    B[:, :q] = U[:, :q] * (S[:q] / s)
    A = complete_rows(Vt[:q], r)
    return LoRAFactors(A.astype(dtype), B.astype(dtype), s)


def orthonormalise(f: LoRAFactors, dtype=None) -> LoRAFactors:
    """Same product, A's rows an orthonormal basis of its row space (QR):
    ``A^T = Q R``, ``A' = Q^T``, ``B' = B R^T``. Keeps the random subspace of
    a fresh LoRA init (where ``B = 0`` and an SVD would say nothing)."""
    dtype = dtype or np.result_type(f.A, f.B)
    r, d_in = f.A.shape
    if r == 0 or r > d_in:
        return refactorise(f, dtype)
    Q, Rm = np.linalg.qr(f.A.astype(np.float64).T)
    rank_ok = np.all(np.abs(np.diag(Rm)) > np.abs(Rm).max() * max(r, d_in) * np.finfo(np.float64).eps)
    if not rank_ok:  # A itself is rank-deficient: complete it
        return refactorise(f, dtype)
    return LoRAFactors(Q.T.astype(dtype), (f.B.astype(np.float64) @ Rm.T).astype(dtype), f.scaling)


@register("fedsvd")
@dataclass
class FedSVD(Strategy):
    """FedSVD: B-only training, exact averaging, SVD re-factorisation keeps A orthonormal (exact).

    Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated
    Learning with LoRA" (NeurIPS 2025, arXiv:2505.12805). As in FFA-LoRA,
    clients freeze A and train and upload only B, so averaging is exact
    (``sum_i p_i s_i B_i A = s B A`` for the shared A) and DP noise on B is
    not multiplied through a product. Unlike FFA-LoRA, A is not frozen for
    ever: after averaging, the server re-factorises the global update

        s B A = U S V^T,     A <- V_r^T,     B <- U_r S_r / s

    so A's rows are the top right singular vectors of the update (orthonormal,
    which bounds B's gradients under DP-SGD) and the effective delta
    ``s B A`` is unchanged by the re-factorisation. At round 0 A is
    orthonormalised by QR (``B`` absorbs ``R^T``), which keeps the random
    initial subspace and the product.

    Bytes: clients upload only B (and extras); every round they download the
    new A as well as B, since A changes with each re-factorisation.

    Parameters
    ----------
    refactor_every : int
        Re-factorise every this many rounds (1: every round); in between A
        stays as it is, as in FFA-LoRA.
    """

    client_dp_unsafe = (
        "its SVD re-factorisation runs before the noise, and one client can move the new factors by more than clip / clients"
    )

    refactor_every: int = 1

    exact = True
    train_parts = ("B",)
    upload_parts = ("B",)

    def __post_init__(self) -> None:
        if int(self.refactor_every) != self.refactor_every or self.refactor_every < 1:
            raise ValueError(f"strategy.refactor_every must be an integer >= 1, got {self.refactor_every!r}")

    def initialize(
        self,
        factors: Mapping[str, LoRAFactors],
        extras: Mapping[str, np.ndarray] | None = None,
        client_ranks: Mapping[str, int] | None = None,
    ) -> ServerState:
        """Round-0 state with each A orthonormalised (same product)."""
        state = super().initialize(factors, extras, client_ranks)
        return state.replace(factors={m: orthonormalise(f) for m, f in state.factors.items()})

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        refactor = (state.round + 1) % int(self.refactor_every) == 0
        factors = dict(state.factors)
        for m, old in state.factors.items():
            sent = [(u, u.factors[m], w) for u, w in zip(updates, weights) if m in u.factors]
            if not sent:
                continue
            updates_m, fs = [u for u, _, _ in sent], [f for _, f, _ in sent]
            p = normalise([w for _, _, w in sent])
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            for u, f in zip(updates_m, fs):  # A is frozen on clients; receive() refills it
                if f.A.shape != old.A.shape or not np.array_equal(f.A, old.A):
                    raise ValueError(
                        f"{self.label}: client {u.client_id} changed A of {m!r}; FedSVD clients must "
                        f"keep A frozen at the value they were sent (train and upload B only)"
                    )
            B = weighted_sum([f.B for f in fs], [pi * f.scaling / s for pi, f in zip(p, fs)])
            new = LoRAFactors(old.A, B.astype(np.result_type(old.B, B)), s)
            factors[m] = refactorise(new) if refactor else new
        return state.replace(factors=factors)
