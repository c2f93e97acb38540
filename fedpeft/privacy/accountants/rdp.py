"""``rdp``: Rényi DP of the Poisson-subsampled Gaussian (opacus ``RDPAccountant``).

Mironov et al. 2019, converted to (epsilon, delta) with Balle et al. 2020, on
dp-accounting's default order grid (opacus's orders plus 11, 128, 256, 512
and 1024, so small epsilons are not cut off by a too-short grid). Add-remove
relation only.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from fedpeft.privacy.accountants.base import Accountant, Segment
from fedpeft.privacy.accountants.registry import register_accountant

__all__ = ["RDPAccountant", "RDP_ORDERS"]

# dp-accounting's DEFAULT_RDP_ORDERS: opacus's default orders plus 11 and
# 128..1024, so that small epsilons (large orders) are not cut off.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)


@register_accountant("rdp")
class RDPAccountant(Accountant):
    """Rényi DP of the Poisson-subsampled Gaussian (opacus ``RDPAccountant``)."""

    title = "RDP"
    orders: ClassVar[tuple[float, ...]] = RDP_ORDERS

    def _epsilon(self, history: list[Segment], delta: float) -> float:
        from opacus.accountants import RDPAccountant as OpacusRDP

        acc = OpacusRDP()
        acc.history = history
        with warnings.catch_warnings():
            # "Optimal order is the largest alpha": only for epsilons far below any target (huge sigma).
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return acc.get_epsilon(delta=delta, alphas=list(self.orders))
