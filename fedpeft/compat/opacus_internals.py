"""The one opacus internal fedpeft uses: ``PRVAccountant._get_domain`` (opacus 1.6).

opacus sizes the PRV accountant's discretisation grid from the history
before composing; with little noise that grid runs to billions of points and
out of memory. :func:`prv_grid_points` asks opacus for the same grid its
``get_epsilon`` would build, so fedpeft can refuse a history before
allocating it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["prv_grid_points"]


def prv_grid_points(history: Sequence[tuple[float, float, int]], eps_error: float, delta_error: float) -> int:
    """Points of the grid opacus's ``PRVAccountant.get_epsilon`` discretises ``history`` on.

    Parameters
    ----------
    history : sequence of (noise_multiplier, sample_rate, steps)
        The accountant's segments; every noise multiplier must be positive.
    eps_error, delta_error : float
        The errors ``get_epsilon`` is called with.

    Returns
    -------
    int
        The grid's size (memory grows linearly with it).
    """
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    domain = PRVAccountant()._get_domain(
        prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
        num_self_compositions=[n for _, _, n in history],
        eps_error=eps_error,
        delta_error=delta_error,
    )
    return int(domain.size)
