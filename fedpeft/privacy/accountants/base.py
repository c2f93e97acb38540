"""The accountant interface: a history of subsampled Gaussian steps and its epsilon.

An accountant stores only its *history*: segments of ``(noise_multiplier,
sample_rate, steps)``, consecutive steps with the same parameters merged.
The epsilon is recomputed from the history by a well-kept library, so any
accountant of a unit can re-account any saved history (switching
``dp.accountant`` on resume is fine).

Every accountant accounts one neighbouring relation: ``"add-remove"`` (one
record added or removed: the data set's size is secret) or
``"replace-one"`` (one record replaced by another: the size is public, as a
fedpeft client's shard size is, through the aggregation weights and its
sampling rate ``q = batch_size / n``). Replacing is removing and adding, so
its epsilon is larger: 10.0 against 4.4 for one full-batch step at sigma 1.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from fedpeft.errors import ConfigError
from fedpeft.privacy.validation import check_delta, check_noise_multiplier, check_sample_rate, check_steps

__all__ = ["Accountant", "Segment", "RELATIONS", "UNITS", "STATE_VERSION", "history_text"]

Segment = tuple[float, float, int]
"""One stretch of identical steps: ``(noise_multiplier, sample_rate, steps)``."""

STATE_VERSION = 1

RELATIONS = ("add-remove", "replace-one")
"""The neighbouring relations an accountant may account (see the module docstring)."""

UNITS = ("sample", "client")
"""What one record is: a training example (DP-SGD) or a whole client (DP-FedAvg)."""

_EPSILONS: dict[tuple, float] = {}
"""Epsilon of (accountant class, settings, relation, history, delta): a pure function, computed once per process."""


class Accountant(ABC):
    """A history of subsampled Gaussian steps and its epsilon.

    Subclasses implement :meth:`_epsilon` (from a non-empty history in which
    every noise multiplier is positive) and are registered with
    :func:`fedpeft.privacy.accountants.register_accountant`.

    Parameters
    ----------
    relation : {"add-remove", "replace-one"}
        The neighbouring relation the epsilon is for; one of :attr:`relations`.
    """

    name: ClassVar[str] = ""
    """Registry name (``dp.accountant``), set by ``register_accountant``."""
    title: ClassVar[str] = ""
    """Name shown in reports, e.g. ``"RDP"``."""
    unit: ClassVar[str] = "sample"
    """The record it protects: ``"sample"`` (Poisson-sampled examples) or ``"client"``."""
    relations: ClassVar[tuple[str, ...]] = ("add-remove",)
    """The neighbouring relations this accountant can account."""
    coarse: ClassVar[type[Accountant] | None] = None
    """A cheaper accountant with nearly the same epsilon, for the first part of a noise calibration
    (:func:`fedpeft.privacy.calibration.calibrate_noise` then confirms with this one); never reported."""

    def __init__(self, relation: str = "add-remove") -> None:
        if relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
        if relation not in self.relations:
            raise ConfigError(f"dp.accountant = {self.name!r} cannot account the {relation} relation; "
                              f"it accounts: {', '.join(self.relations)}")
        self.relation = relation
        self._history: list[Segment] = []

    # recording -----------------------------------------------------------

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Accountant:
        """Record ``steps`` steps of the subsampled Gaussian mechanism.

        Parameters
        ----------
        noise_multiplier : float
            Noise standard deviation over the clipping norm (>= 0).
        sample_rate : float
            Sampling probability of each record, in (0, 1].
        steps : int
            How many such steps (0 records nothing).

        Returns
        -------
        Accountant
            ``self``, so calls can be chained.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = self._check_sample_rate(check_sample_rate(sample_rate))
        steps = check_steps(steps)
        if steps == 0:
            return self
        if self._history and self._history[-1][:2] == (sigma, q):
            last = self._history[-1]
            self._history[-1] = (sigma, q, last[2] + steps)
        else:
            self._history.append((sigma, q, steps))
        return self

    def _check_sample_rate(self, q: float) -> float:
        """Hook for accountants whose sampling fixes the rate; returns ``q``."""
        return q

    @property
    def history(self) -> tuple[Segment, ...]:
        """The recorded segments ``(noise_multiplier, sample_rate, steps)``, oldest first."""
        return tuple(self._history)

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(seg[2] for seg in self._history)

    # accounting ------------------------------------------------------------

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this ``delta`` (an upper bound).

        0.0 for an empty history; ``inf`` if any step used no noise.
        """
        delta = check_delta(delta)
        if not self._history:
            return 0.0
        if any(sigma == 0.0 for sigma, _, _ in self._history):
            return math.inf
        # Process-wide: every client's accountant asks again each round, and PLD takes a while.
        key = (type(self), self._settings(), self.relation, tuple(self._history), delta)
        if key not in _EPSILONS:
            _EPSILONS[key] = float(self._epsilon(list(self._history), delta))
        return _EPSILONS[key]

    def _settings(self) -> tuple:
        """The accountant's tunables (part of the epsilon cache key)."""
        return ()

    @abstractmethod
    def _epsilon(self, history: list[Segment], delta: float) -> float:
        """Epsilon of ``history`` (non-empty, every sigma > 0) at ``delta``."""

    # state -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history as plain JSON data (flat lists: fits a Flower ``ConfigRecord``).

        Returns
        -------
        dict
            ``{"accountant": name, "version": 1, "noise_multipliers": [...],
            "sample_rates": [...], "steps": [...]}``, one list entry per segment.
        """
        return {
            "accountant": self.name,
            "version": STATE_VERSION,
            "noise_multipliers": [float(s) for s, _, _ in self._history],
            "sample_rates": [float(q) for _, q, _ in self._history],
            "steps": [int(n) for _, _, n in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with the one in ``state`` (from :meth:`state_dict`).

        The history does not depend on the accountant, so a state saved by one
        accountant may be loaded into another (it is simply re-accounted).

        Raises
        ------
        ValueError
            If ``state`` is not a valid accountant state.
        """
        try:
            version = state["version"]
            sigmas, rates, counts = (list(state[k]) for k in ("noise_multipliers", "sample_rates", "steps"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an accountant state (missing or malformed {exc}): {state!r}") from None
        if version != STATE_VERSION:
            raise ValueError(f"accountant state version {version!r} is not supported (expected {STATE_VERSION})")
        if not len(sigmas) == len(rates) == len(counts):
            raise ValueError(
                f"accountant state lists differ in length: {len(sigmas)} noise_multipliers, "
                f"{len(rates)} sample_rates, {len(counts)} steps"
            )
        history: list[Segment] = []
        for i, (s, q, n) in enumerate(zip(sigmas, rates, counts)):
            try:
                history.append((check_noise_multiplier(s, "noise_multiplier"),
                                self._check_sample_rate(check_sample_rate(q, "sample_rate")),
                                check_steps(n, "steps", minimum=1)))
            except ConfigError as exc:
                raise ValueError(f"accountant state, segment {i}: {exc}") from None
        self._history = history

    def copy(self) -> Accountant:
        """An independent accountant of the same kind and settings with the same history."""
        other = copy.copy(self)
        other._history = list(self._history)
        return other

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, segments={len(self._history)}, relation={self.relation!r})"


def history_text(history: list[Segment] | tuple[Segment, ...]) -> str:
    """``"σ=1.1, q=0.01, 1000 steps; ..."`` for messages."""
    return "; ".join(f"σ={s:g}, q={q:g}, {n} steps" for s, q, n in history)
