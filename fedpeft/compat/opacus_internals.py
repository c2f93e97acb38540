"""The opacus internals fedpeft uses (opacus 1.6): ``PRVAccountant._get_domain`` and ``optimizer._generate_noise``.

opacus sizes the PRV accountant's discretisation grid from the history
before composing; with little noise that grid runs to billions of points and
out of memory. :func:`prv_grid_points` asks opacus for the same grid its
``get_epsilon`` would build, so fedpeft can refuse a history before
allocating it.

The batched engine clips and noises K clients' per-example gradients itself
(:mod:`fedpeft.privacy.stacked_dp`); :func:`gaussian_noise` is the very
function ``DPOptimizer.add_noise`` draws each tensor's noise with, so a
client's noise is the draw it would make alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["gaussian_noise", "prv_grid_points"]


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


def gaussian_noise(std: float, reference: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The noise ``DPOptimizer.add_noise`` adds to a parameter whose summed clipped gradient is ``reference``.

    ``N(0, std^2)`` of ``reference``'s shape, dtype and device, drawn from
    ``generator`` (zeros, drawing nothing, when ``std`` is 0); opacus's
    ``secure_mode`` off, as fedpeft's :func:`~fedpeft.privacy.dp_sgd.dp_optimizer` leaves it.
    """
    from opacus.optimizers.optimizer import _generate_noise

    return _generate_noise(std=std, reference=reference, generator=generator, secure_mode=False)
