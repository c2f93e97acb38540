"""``prv``: privacy random variables (opacus ``PRVAccountant``, Gopi et al. 2021).

Numerical composition; tighter than RDP. Its upper bound is at most
:attr:`PRVAccountant.eps_error` (0.01) above the true epsilon. Add-remove
relation only.
"""

from __future__ import annotations

from typing import ClassVar

from fedpeft.compat.opacus_internals import prv_grid_points
from fedpeft.errors import ConfigError
from fedpeft.privacy.accountants.base import Accountant, Segment, history_text
from fedpeft.privacy.accountants.registry import register_accountant

__all__ = ["PRVAccountant", "PRVGridTooLarge"]


class PRVGridTooLarge(ConfigError):
    """The PRV accountant would need more memory than allowed for this history."""


@register_accountant("prv")
class PRVAccountant(Accountant):
    """Privacy random variables (opacus ``PRVAccountant``); upper bound within ``eps_error``."""

    title = "PRV"
    eps_error: ClassVar[float] = 0.01
    """Largest amount by which the reported epsilon may exceed the true one (opacus's default)."""
    max_grid_points: ClassVar[int] = 5_000_000
    """Refuse histories whose discretisation grid is larger (about 1 GB of memory at this size)."""

    def _settings(self) -> tuple:
        return (self.eps_error, self.max_grid_points)

    def _epsilon(self, history: list[Segment], delta: float) -> float:
        from opacus.accountants import PRVAccountant as OpacusPRV

        delta_error = delta / 1000  # opacus's default
        # opacus sizes its grid from the RDP epsilon; with little noise that grid
        # runs to billions of points (and out of memory), so check it first.
        points = prv_grid_points(history, self.eps_error, delta_error)
        if points > self.max_grid_points:
            raise PRVGridTooLarge(
                f"dp.accountant = 'prv' would need a {points:,}-point grid for this history "
                f"({history_text(history)}), more than {self.max_grid_points:,}; "
                "use dp.accountant = 'rdp' or more noise"
            )
        acc = OpacusPRV()
        acc.history = history
        return acc.get_epsilon(delta=delta, eps_error=self.eps_error, delta_error=delta_error)
