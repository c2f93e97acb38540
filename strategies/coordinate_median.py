"""Coordinate-wise median of the clients' full adapted updates (robust to Byzantine clients)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .coordinate_robust import CoordinateRobust
from .registry import register

__all__ = ["CoordinateMedian"]


@register("median")
@dataclass
class CoordinateMedian(CoordinateRobust):
    """Coordinate-wise median of the clients' updates, re-factorised exactly (robust, inexact as a mean).

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates" (ICML 2018). Per module, the new adapted weight is the
    coordinate-wise median over the round's clients of
    ``residual + s_i B_i A_i``, unweighted (a hostile client could claim any
    example count), split by SVD into rank-``r`` factors plus a residual
    (:mod:`strategies.coordinate_robust`); the head's tensors are medians
    too. While fewer than half the clients are hostile, every coordinate
    stays within the honest clients' range. Clients must share one rank;
    residuals travel to the clients (dense ``d_out x d_in``, as FedEx-LoRA's).
    """

    def statistic(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)
