"""FedSA-LoRA: share and average A, keep B personal to each client."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import NEW_CLIENT, ClientUpdate, LoRAFactors, ServerState
from .utils import normalise, weighted_sum

__all__ = ["FedSALoRA"]


@register("fedsa-lora")
@dataclass
class FedSALoRA(Strategy):
    """FedSA-LoRA: A shared and averaged, B kept per client (personalised; inexact by design).

    Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated
    Learning" (2024). Their analysis finds that ``A`` learns knowledge common
    to all clients and ``B`` client-specific knowledge, so only ``A`` is
    aggregated,

        A = sum_i p_i A_i,    p_i = n_i / sum_j n_j   (this round's clients)

    and each client keeps its own ``B_i``: its model is
    ``W0 + s_i B_i A`` (``state.effective_delta(m, client_id=cid)``).

    State: client ``cid``'s factors are ``state.client_factors[cid][m] =
    (A, B_i, s_i)``, refreshed to the new global ``A`` every round (one shared
    array, written once in checkpoints). Clients never seen get the initial
    factors, kept as ``state.client_factors["*"]`` (``strategies.state.NEW_CLIENT``),
    with the current ``A``. ``state.factors[m]`` (what centralised evaluation
    uses) is the global ``A`` with the example-weighted mean of the kept
    ``B``'s of every client seen so far, ``s B = sum_j q_j s_j B_j``, ``q_j``
    by the client's latest ``num_examples`` (``state.meta["num_examples"]``);
    it is a summary, not a model any client trains.

    Wire: a client receives the global ``A``, its own ``B`` and the extras,
    and uploads ``A``, ``B`` and the extras; both directions are counted as
    sent. Uploading ``B`` is a simulation choice: fedpeft's clients are
    stateless, so the server keeps ``B`` to hand it back next round. In a real
    deployment ``B`` would stay on the device, halving both directions, and
    the server would never see it (this matters for the privacy audit: here
    the server sees ``B``). Extras (classifier head) are averaged as usual.
    Clients must share one rank.
    """

    client_dp_unsafe = "the server keeps each client's own B and returns it outside the noised mean"

    exact = False
    personalised = True

    def initialize(
        self,
        factors: Mapping[str, LoRAFactors],
        extras: Mapping[str, np.ndarray] | None = None,
        client_ranks: Mapping[str, int] | None = None,
    ) -> ServerState:
        state = super().initialize(factors, extras, client_ranks)
        # newcomers start from the initial factors (shared arrays, immutable)
        meta = {**state.meta, "num_examples": {}}
        return state.replace(client_factors={NEW_CLIENT: dict(state.factors)}, meta=meta)

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        kept = {c: dict(fs) for c, fs in state.client_factors.items()}
        counts = dict(state.meta.get("num_examples") or {})
        counts.update({u.client_id: u.num_examples for u in updates})
        factors = dict(state.factors)
        for m, old in state.factors.items():
            sent = [(u, w) for u, w in zip(updates, weights) if m in u.factors]
            if not sent:
                continue
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            p = normalise([w for _, w in sent])  # over the clients that sent m
            A = weighted_sum([u.factors[m].A for u, _ in sent], p)
            for u, _ in sent:  # each client keeps its own B
                kept.setdefault(u.client_id, {})[m] = LoRAFactors(A, u.factors[m].B, u.factors[m].scaling)
            for c, fs in kept.items():  # everyone's model uses the new A
                if m in fs and fs[m].A is not A:
                    fs[m] = LoRAFactors(A, fs[m].B, fs[m].scaling)
            clients = sorted(c for c in kept if c != NEW_CLIENT and m in kept[c])
            q = normalise([counts.get(c, 0) for c in clients])
            B = weighted_sum(
                [kept[c][m].B for c in clients], [qi * kept[c][m].scaling / s for qi, c in zip(q, clients)]
            )
            factors[m] = LoRAFactors(A, B, s)
        meta = {**state.meta, "num_examples": dict(sorted(counts.items()))}
        return state.replace(factors=factors, client_factors=kept, meta=meta)
