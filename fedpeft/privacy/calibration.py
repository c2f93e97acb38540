"""Noise calibration: the noise multiplier that reaches a target epsilon.

A bisection on the same accountant that will later report the epsilon, so the
calibrated run's reported epsilon is at most the target by construction (every
candidate is checked by that accountant, none is extrapolated). An accountant
with a cheaper :attr:`~fedpeft.privacy.accountants.Accountant.coarse` twin
(PLD on a coarser grid) is searched with the twin first; the real accountant
then only brackets and bisects a few percent around that guess.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fedpeft.errors import ConfigError
from fedpeft.privacy.accountants import PRVGridTooLarge, check_accountant, client_level_epsilon, create_accountant
from fedpeft.privacy.validation import check_delta, check_sample_rate, check_steps, check_target_epsilon

__all__ = ["calibrate_noise", "calibrate_client_noise", "smallest_noise_multiplier", "MAX_NOISE_MULTIPLIER",
           "MIN_NOISE_MULTIPLIER"]

MAX_NOISE_MULTIPLIER = 1e6
"""Give up (ConfigError) if the target needs more noise than this (opacus's limit too)."""
MIN_NOISE_MULTIPLIER = 1e-2
"""Stop searching below this: a target this loose is met with almost no noise."""


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp", *, rtol: float = 0.005, relation: str = "add-remove") -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` steps is <= the target.

    Parameters
    ----------
    target_epsilon : float
        The epsilon not to exceed (``dp.target_epsilon``).
    delta : float
        The delta of the guarantee (``dp.delta``).
    sample_rate : float
        Poisson sampling rate q of every step, in (0, 1].
    steps : int
        Planned number of steps (>= 1). Plan for the most any record's unit
        (a client, or the server) will take; fewer steps only lower epsilon.
    accountant : str
        Registered accountant that will report the epsilon (``dp.accountant``).
    rtol : float
        Stop once ``epsilon >= (1 - rtol) * target_epsilon``.
    relation : {"add-remove", "replace-one"}
        The neighbouring relation of the guarantee.

    Returns
    -------
    float
        A noise multiplier sigma with ``(1 - rtol) * target <= epsilon(sigma) <= target``
        (only the upper bound holds if the target is met below
        :data:`MIN_NOISE_MULTIPLIER`).

    Raises
    ------
    ConfigError
        For an invalid argument (naming its ``dp.*`` key), or a target that
        needs a noise multiplier above :data:`MAX_NOISE_MULTIPLIER`.
    """
    target = check_target_epsilon(target_epsilon)
    delta = check_delta(delta)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, minimum=1)
    accountant = check_accountant(accountant)
    if not 0.0 <= rtol < 1.0:
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")

    def epsilon_with(cls) -> Callable[[float], float]:
        def eps(sigma: float) -> float:
            try:
                return cls(relation).step(sigma, q, steps).epsilon(delta)
            except PRVGridTooLarge:  # only happens with little noise: far above any sane target
                return math.inf

        return eps

    setting = f"delta={delta:g}, q={q:g}, {steps} steps, {relation}"
    cls = type(create_accountant(accountant, relation=relation))
    guess = None
    if cls.coarse is not None:
        guess = smallest_noise_multiplier(epsilon_with(cls.coarse), target, 0.02, setting)
    return smallest_noise_multiplier(epsilon_with(cls), target, rtol, setting, start=guess)


def calibrate_client_noise(target_epsilon: float, delta: float, num_clients: int, clients_per_round: int,
                           rounds: int) -> float:
    """The smallest noise multiplier whose client-level epsilon after ``rounds`` is <= the target."""
    return smallest_noise_multiplier(
        lambda s: client_level_epsilon(s, num_clients, clients_per_round, rounds, delta),
        target_epsilon,
        setting=f"client level, {clients_per_round} of {num_clients} clients, {rounds} rounds, delta={delta:g}",
    )


def smallest_noise_multiplier(eps: Callable[[float], float], target: float, rtol: float = 0.005,
                              setting: str = "", start: float | None = None) -> float:
    """The smallest sigma with ``eps(sigma) <= target`` (``eps`` decreasing in sigma).

    Returns a sigma with ``(1 - rtol) * target <= eps(sigma) <= target``, or
    the largest sigma tried below :data:`MIN_NOISE_MULTIPLIER` if even that
    meets the target; ``setting`` describes the mechanism in the error raised
    when no sigma up to :data:`MAX_NOISE_MULTIPLIER` reaches the target.
    ``start``, a guess of the answer, brackets it in steps of 2% instead of
    doubling from 1.
    """
    factor = 2.0 if start is None else 1.02
    # Bracket: eps(lo) > target >= eps(hi).
    hi = 1.0 if start is None else min(max(start, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    eps_hi = eps(hi)
    if eps_hi > target:
        lo = hi
        while eps_hi > target:
            lo, hi = hi, factor * hi
            if hi > MAX_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"dp.target_epsilon = {target!r} cannot be reached with a noise multiplier "
                    f"<= {MAX_NOISE_MULTIPLIER:g} ({setting}); raise it"
                )
            eps_hi = eps(hi)
    else:
        lo = hi / factor
        eps_lo = eps(lo)
        while eps_lo <= target:
            hi, eps_hi = lo, eps_lo
            lo = lo / factor
            if lo < MIN_NOISE_MULTIPLIER:
                return hi
            eps_lo = eps(lo)

    # Bisect in log sigma, keeping eps(hi) <= target, until eps(hi) is close.
    while eps_hi < (1.0 - rtol) * target and hi / lo > 1.0 + 1e-9:
        mid = math.sqrt(lo * hi)
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi
