"""FLoRA: stack the clients' factors (any ranks), merge into the base, restart adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, Payload, ServerState

__all__ = ["FLoRA"]


@register("flora")
@dataclass
class FLoRA(Strategy):
    """FLoRA: stack client factors of any rank, merge into the base, restart adapters (exact).

    Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS 2024. Stacking the clients'
    factors,

        A = concat_rows(p_1 A_1, ..., p_k A_k)      (sum_i r_i, d_in)
        B = concat_cols(s_1 B_1, ..., s_k B_k)      (d_out, sum_i r_i)

    gives ``B A = sum_i p_i s_i B_i A_i`` exactly, whatever each client's rank
    ``r_i``. The stacked product is merged into the frozen base each round
    (``state.residuals[m]``, absolute: the running total since round 0) and
    clients restart from fresh adapters at their own rank: ``B = 0`` and a new
    ``A`` drawn from ``uniform(-1/sqrt(d_in), 1/sqrt(d_in))`` (the bound of
    peft's default ``kaiming_uniform_(a=sqrt(5))`` init), seeded by
    ``(seed, round, module)``. The global factors hold that draw at the
    largest rank and ``B = 0``; a client of rank ``r`` gets its first ``r``
    rows (see :meth:`Strategy.client_rank` and ``initialize(client_ranks=)``).
    :meth:`initialize` merges a nonzero initial ``s B0 A0`` into the
    residual the same way, so round 0 already starts from ``B = 0``.

    Wire: clients receive the dense residual (counted in the download bytes),
    their fresh ``A`` and zero ``B``, and the extras; they upload ``A``, ``B``
    and the extras. The paper sends each round's stacked factors
    (``sum_i r_i (d_in + d_out)`` numbers) to stateful clients that merge
    them; fedpeft sends the absolute dense residual so clients need no
    memory. (The paper's public code had a typo in its FedIT baseline that
    used one client only; do not compare against that branch.)

    Client side: set the base weight to ``W0 + residual``, load ``A`` and
    ``B = 0`` at the client's rank, and train with the payload's scaling.
    """

    client_dp_unsafe = (
        "it stacks every client's factors into the global adapter, so each one is released without noise"
    )

    exact = True
    heterogeneous_ranks = True

    # -- fresh adapters -------------------------------------------------------
    def fresh_factors(self, round: int, module: str, like: LoRAFactors, rank: int) -> LoRAFactors:
        """The restart adapter of ``module`` for ``round``: seeded uniform A of
        ``rank`` rows, B = 0; dtype and scaling of ``like``."""
        d_out, d_in = like.shape
        dtype = np.result_type(like.A, like.B)
        bound = 1.0 / np.sqrt(d_in) if d_in else 0.0
        A = self.rng(round, "flora-A", module).uniform(-bound, bound, size=(rank, d_in)).astype(dtype)
        return LoRAFactors(A, np.zeros((d_out, rank), dtype), like.scaling)

    def initialize(
        self,
        factors: Mapping[str, LoRAFactors],
        extras: Mapping[str, np.ndarray] | None = None,
        client_ranks: Mapping[str, int] | None = None,
    ) -> ServerState:
        state = super().initialize(factors, extras, client_ranks)
        top = max((state.meta.get("client_ranks") or {}).values(), default=0)
        new_factors, residuals = {}, {}
        for m, f in state.factors.items():
            if np.any(f.B) and np.any(f.A):  # keep the initial delta, in the base
                residuals[m] = f.delta(np.float64).astype(np.result_type(f.A, f.B))
            new_factors[m] = self.fresh_factors(0, m, f, max(f.rank, top))
        return state.replace(factors=new_factors, residuals=residuals)

    def payload_for(self, state: ServerState, client_id: str) -> Payload:
        """The residuals, the extras and, per module, the first
        ``client_rank`` rows of the fresh A with B = 0."""
        factors = {}
        for m, f in state.factors.items():
            r = min(self.client_rank(state, client_id, m), f.rank)
            factors[m] = LoRAFactors(f.A[:r], f.B[:, :r], f.scaling)
        return Payload(factors=factors, residuals=dict(state.residuals), extras=dict(state.extras))

    # -- aggregation ----------------------------------------------------------
    @staticmethod
    def stack(factors: Sequence[LoRAFactors], weights: Sequence[float]) -> LoRAFactors:
        """``A = concat_rows(p_i A_i)``, ``B = concat_cols(s_i B_i)``,
        scaling 1, so that ``B @ A = sum_i p_i s_i B_i A_i`` (float64)."""
        A = np.concatenate([p * f.A.astype(np.float64) for f, p in zip(factors, weights)], axis=0)
        B = np.concatenate([f.scaling * f.B.astype(np.float64) for f in factors], axis=1)
        return LoRAFactors(A, B, 1.0)

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors, residuals = dict(state.factors), dict(state.residuals)
        for m, old, fs, p in self.module_updates(state, updates, weights):
            stacked = self.stack(fs, p)
            merged = stacked.B @ stacked.A
            dtype = np.result_type(old.A, old.B, *(f.A for f in fs), *(f.B for f in fs))
            if m in state.residuals:
                dtype = np.result_type(dtype, state.residuals[m])
                merged = merged + state.residuals[m].astype(np.float64)
            residuals[m] = merged.astype(dtype)
            factors[m] = self.fresh_factors(state.round + 1, m, old, old.rank)
        return state.replace(factors=factors, residuals=residuals)
