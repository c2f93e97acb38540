"""FedIT with every client's update clipped to a norm bound first (bounded influence of any one client)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .fedit import FedIT
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState

__all__ = ["NormBoundedFedIT", "clip_update"]


def clip_update(state: ServerState, update: ClientUpdate, max_norm: float) -> ClientUpdate:
    """``update`` moved back towards the global state so that its change (every A, B and head tensor
    together, as one vector) has L2 norm at most ``max_norm``."""
    deltas = [f.A.astype(np.float64) - state.factors[m].A for m, f in update.factors.items()]
    deltas += [f.B.astype(np.float64) - state.factors[m].B for m, f in update.factors.items()]
    deltas += [x.astype(np.float64) - state.extras[n] for n, x in update.extras.items()]
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas))
    if norm <= max_norm:
        return update
    c = max_norm / norm

    def toward(new: np.ndarray, old: np.ndarray) -> np.ndarray:
        return (old + c * (new.astype(np.float64) - old)).astype(new.dtype)

    factors = {m: LoRAFactors(toward(f.A, state.factors[m].A), toward(f.B, state.factors[m].B), f.scaling)
               for m, f in update.factors.items()}
    extras = {n: toward(x, state.extras[n]) for n, x in update.extras.items()}
    return ClientUpdate(update.client_id, factors, update.num_examples, extras, dict(update.metrics))


@register("norm-bounded-fedit")
@dataclass
class NormBoundedFedIT(FedIT):
    """FedIT after clipping each client's update to ``max_norm`` (bounded influence, inexact).

    Sun et al., "Can You Really Backdoor Federated Learning?" (2019): norm
    bounding of the updates. Each client's change from the global factors it
    was sent (all its A, B and head tensors as one vector) is scaled down to
    L2 norm ``max_norm`` when longer, then A and B are averaged separately by
    examples as in FedIT. One client's pull on the global adapter is then at
    most its weight times ``max_norm``, however it scales its update; a
    hostile client that also claims a large example count still gets that
    count's weight. Clients must share one rank.

    Parameters
    ----------
    max_norm : float
        The L2 bound on each client's update, > 0.
    """

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.max_norm)) and float(self.max_norm) > 0):
            raise ValueError(f"strategy.max_norm must be a positive number, got {self.max_norm!r}")

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        updates = list(updates)
        self.validate(state, updates)  # before the clipping reads the shapes
        return super().aggregate(state, [clip_update(state, u, float(self.max_norm)) for u in updates])
