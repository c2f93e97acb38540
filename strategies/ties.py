"""TIES-merging of the clients' factor updates: trim, elect sign, disjoint mean."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, ServerState

__all__ = ["TIESMerging", "trim", "elect_sign", "disjoint_mean", "ties_merge"]


def trim(d: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``ceil(density * d.size)`` entries of largest magnitude, zero
    the rest. Ties are broken by position (first in C order wins), so the
    result is deterministic. float64."""
    d = np.asarray(d, np.float64)
    k = min(d.size, math.ceil(density * d.size - 1e-9))
    out = np.zeros(d.size)
    if k > 0:
        flat = d.ravel()
        keep = np.argsort(-np.abs(flat), kind="stable")[:k]
        out[keep] = flat[keep]
    return out.reshape(d.shape)


def elect_sign(trimmed: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Per coordinate, the sign (+1, -1 or 0) of ``sum_i w_i t_i``: the
    direction with the larger total (weighted) mass."""
    return np.sign(sum(float(w) * t for w, t in zip(weights, trimmed)))


def disjoint_mean(trimmed: Sequence[np.ndarray], weights: Sequence[float], sign: np.ndarray) -> np.ndarray:
    """Per coordinate, the weighted mean over the clients whose trimmed value
    is nonzero and has the elected sign (0 where none does)."""
    num = np.zeros(sign.shape)
    den = np.zeros(sign.shape)
    for w, t in zip(weights, trimmed):
        agree = (np.sign(t) == sign) & (t != 0)
        num += np.where(agree, float(w) * t, 0.0)
        den += np.where(agree, float(w), 0.0)
    return np.divide(num, den, out=np.zeros(sign.shape), where=den > 0)


def ties_merge(updates: Sequence[np.ndarray], weights: Sequence[float], density: float) -> np.ndarray:
    """TIES-merging of task vectors: trim each, elect signs, disjoint mean."""
    trimmed = [trim(d, density) for d in updates]
    sign = elect_sign(trimmed, weights)
    return disjoint_mean(trimmed, weights, sign)


@register("ties")
@dataclass
class TIESMerging(Strategy):
    """TIES-merging of client updates: trim to top-k%, elect sign, disjoint mean (inexact).

    Yadav et al., "TIES-Merging: Resolving Interference When Merging Models"
    (NeurIPS 2023), a model-merging rule from the PEFT merging literature,
    applied here to federated aggregation. Client ``i``'s update ("task
    vector") is the change of its factors from the global ones it was sent,
    ``dA_i = A_i - A`` and ``dB_i = (s_i / s) B_i - B``, taken for A and B
    separately (in factor space, so the merged global stays rank ``r``; a
    dense-delta merge would need a truncation back to low rank). Per module
    and factor:

    1. trim: keep each client's ``density`` fraction of entries of largest
       magnitude (per tensor), zero the rest;
    2. elect: per coordinate, the sign of the example-weighted sum of the
       trimmed values;
    3. disjoint mean: average (weighted by examples) only the trimmed values
       that are nonzero and agree with the elected sign.

    The new global factor is ``old + scale * merged``. With ``density=1`` and
    clients that agree in sign everywhere this is FedIT's weighted average.
    Like FedIT it is inexact (and trimming adds its own error); clients must
    share one rank. Extras (classifier head) are averaged by examples.

    Parameters
    ----------
    density : float
        Fraction of each update's entries kept by the trim step, in (0, 1].
    scale : float
        Step size applied to the merged update (TIES' lambda).
    """

    client_dp_unsafe = (
        "trimming and sign election depend on each client's update, so one client moves the merge by more than clip / clients"
    )

    density: float = 0.2
    scale: float = 1.0

    exact = False

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"strategy.density must be in (0, 1], got {self.density!r}")
        if not math.isfinite(float(self.scale)):
            raise ValueError(f"strategy.scale must be finite, got {self.scale!r}")

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        factors = dict(state.factors)
        for m, old, fs, p in self.module_updates(state, updates, weights):
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            A0 = old.A.astype(np.float64)
            B0 = old.B.astype(np.float64)
            dA = ties_merge([f.A.astype(np.float64) - A0 for f in fs], p, self.density)
            dB = ties_merge([f.scaling / s * f.B.astype(np.float64) - B0 for f in fs], p, self.density)
            dtype = np.result_type(old.A, old.B, *[a for f in fs for a in (f.A, f.B)])
            factors[m] = LoRAFactors(
                (A0 + self.scale * dA).astype(dtype), (B0 + self.scale * dB).astype(dtype), s
            )
        return state.replace(factors=factors)
