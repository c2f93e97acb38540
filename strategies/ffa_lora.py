"""FFA-LoRA: freeze A at its shared random init, train and average only B."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState
from .utils import normalise, weighted_sum

__all__ = ["FFALoRA"]


@register("ffa-lora")
@dataclass
class FFALoRA(Strategy):
    """FFA-LoRA: A frozen at a shared random init, only B trained and sent (exact, half the upload).

    Sun et al., "Improving LoRA in Privacy-preserving Federated Learning",
    ICLR 2024. Every client starts from the same randomly initialised ``A``
    (the model's own seeded LoRA init, kept by :meth:`initialize`) and never
    trains it; only ``B`` is trained and uploaded. Because ``A`` is common,
    averaging ``B`` alone is the exact mean of the clients' updates:

        s B = sum_i p_i s_i B_i   =>   s B A = sum_i p_i s_i B_i A,   p_i = n_i / sum_j n_j

    so there is no FedIT covariance error, and under differential privacy the
    noise added to ``B`` is not multiplied by noise in ``A``. The upload is
    ``B`` (+ extras) only, about half of FedIT's.

    Wire: clients receive ``A``, ``B`` and the extras (``A`` is sent every
    round so that stateless clients need no memory; a deployment could
    regenerate it from the shared seed instead) and send back ``B`` and the
    extras. The server refills ``A`` from its state (:meth:`receive`).

    Client side: freeze ``lora_A`` (``trainable(m) == {"A": False, "B": True}``);
    an update whose ``A`` differs from the server's is rejected with
    ``ValueError``, since averaging ``B`` would no longer be exact. The
    paper also suggests a larger ``alpha`` to make up for the frozen ``A``.
    """

    client_dp_unsafe = None  # the global arrays are the uniform mean of the uploads

    exact = True
    train_parts = ("B",)
    upload_parts = ("B",)

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors = dict(state.factors)
        for m, old in state.factors.items():
            sent = [(u, w) for u, w in zip(updates, weights) if m in u.factors]
            if not sent:
                continue
            for u, _ in sent:
                A = u.factors[m].A
                if A.shape != old.A.shape or not np.array_equal(A, old.A):
                    raise ValueError(
                        f"{self.label}: client {u.client_id} changed the frozen A of {m!r}; "
                        f"FFA-LoRA clients train B only (strategy.trainable({m!r}) == "
                        f"{self.trainable(m)})"
                    )
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            p = normalise([w for _, w in sent])  # over the clients that sent m
            fs = [u.factors[m] for u, _ in sent]
            B = weighted_sum([f.B for f in fs], [pi * f.scaling / s for pi, f in zip(p, fs)])
            factors[m] = LoRAFactors(old.A, B, s)  # A kept from the state
        return state.replace(factors=factors)
