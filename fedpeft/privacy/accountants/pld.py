"""``pld``: privacy loss distributions (Google dp-accounting ``pld.PLDAccountant``, pessimistic).

Tight and independent of opacus; the only sample-level accountant that also
accounts the replace-one relation, which fedpeft's public shard sizes need.
"""

from __future__ import annotations

from typing import ClassVar

from fedpeft.privacy.accountants.base import RELATIONS, Accountant, Segment
from fedpeft.privacy.accountants.registry import register_accountant

__all__ = ["CoarsePLDAccountant", "PLDAccountant"]


@register_accountant("pld")
class PLDAccountant(Accountant):
    """Privacy loss distributions (Google dp-accounting ``pld.PLDAccountant``, pessimistic)."""

    title = "PLD"
    relations = RELATIONS
    value_discretization_interval: ClassVar[float] = 1e-4
    """dp-accounting's default; coarser grids (1e-3) overestimate small epsilons."""

    def _settings(self) -> tuple:
        return (self.value_discretization_interval,)

    def _epsilon(self, history: list[Segment], delta: float) -> float:
        import dp_accounting
        from dp_accounting import pld

        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.relation == "replace-one"
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc = pld.PLDAccountant(relation, value_discretization_interval=self.value_discretization_interval)
        for sigma, q, n in history:
            acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n)
        return acc.get_epsilon(delta)


class CoarsePLDAccountant(PLDAccountant):
    """PLD on a 1e-3 grid: about ten times faster, for calibration's first search only (not registered)."""

    value_discretization_interval: ClassVar[float] = 1e-3


PLDAccountant.coarse = CoarsePLDAccountant
