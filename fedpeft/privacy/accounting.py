"""Privacy accountants for the Poisson-subsampled Gaussian mechanism.

One small interface over well-kept libraries, so that a client (sample-level
DP-SGD) or the server (client-level DP-FedAvg) can record what it did and ask
what it cost:

    acc = create_accountant("rdp")
    acc.step(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
    acc.epsilon(delta=1e-5)          # 1.712
    state = acc.state_dict()         # JSON / Flower ConfigRecord friendly
    create_accountant("rdp", state)  # same history, same epsilon

An accountant stores only its *history*: segments of ``(noise_multiplier,
sample_rate, steps)``, consecutive steps with the same parameters merged. The
epsilon is recomputed from the history by the library, so any accountant can
re-account any saved history (switching ``dp.accountant`` on resume is fine).

Every accountant accounts one neighbouring relation: ``"add-remove"`` (one
record added or removed: the data set's size is secret) or
``"replace-one"`` (one record replaced by another: the size is public, as a
fedpeft client's shard size is, through the aggregation weights and its
sampling rate ``q = batch_size / n``). Replacing is removing and adding, so
its epsilon is larger: 10.0 against 4.4 for one full-batch step at sigma 1.

Registered accountants (all give an upper bound on epsilon):

``rdp``
    opacus ``RDPAccountant`` (Rényi DP of the subsampled Gaussian, Mironov et
    al. 2019, converted with Balle et al. 2020) on dp-accounting's default
    order grid (opacus's orders plus 11, 128, 256, 512 and 1024, so small
    epsilons are not cut off by a too-short grid).
``prv``
    opacus ``PRVAccountant`` (Gopi et al. 2021, numerical composition of
    privacy random variables). Tighter than RDP; its upper bound is at most
    ``PRVAccountant.eps_error`` (0.01) above the true epsilon.
``pld``
    Google dp-accounting ``pld.PLDAccountant`` (privacy loss distributions,
    pessimistic estimate). Tight, independent of opacus.

The validation helpers (``check_*``) raise :class:`fedpeft.errors.ConfigError`
with one line that names the config key, like the rest of fedpeft's config.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from fedpeft.errors import ConfigError

__all__ = [
    "Accountant",
    "Segment",
    "RDPAccountant",
    "PRVAccountant",
    "PLDAccountant",
    "PRVGridTooLarge",
    "register_accountant",
    "available_accountants",
    "create_accountant",
    "accountant_title",
    "compute_epsilon",
    "check_delta",
    "check_sample_rate",
    "check_noise_multiplier",
    "check_target_epsilon",
    "check_steps",
    "check_accountant",
    "RELATIONS",
    "check_relation",
]

Segment = tuple[float, float, int]
"""One stretch of identical steps: ``(noise_multiplier, sample_rate, steps)``."""

STATE_VERSION = 1

RELATIONS = ("add-remove", "replace-one")
"""The neighbouring relations an accountant may account (see the module docstring)."""


# --- validation ---------------------------------------------------------------


def _number(value: Any, key: str) -> float:
    """``value`` as a finite float, or a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return value


def check_delta(delta: Any, num_records: int | None = None, key: str = "dp.delta") -> float:
    """Validate delta: set, in (0, 1), and below ``1 / num_records``.

    Parameters
    ----------
    delta : float or None
        The delta of the (epsilon, delta) guarantee.
    num_records : int, optional
        How many records the unit protects: a client's examples for
        sample-level DP (pass the smallest shard), the number of clients for
        client-level DP. A delta of ``1/n`` or more allows leaking a whole
        record outright, so it is refused.
    key : str
        Config key named in the error.

    Returns
    -------
    float
        ``delta`` as a float.

    Raises
    ------
    ConfigError
        If delta is missing, not in (0, 1), or ``>= 1 / num_records``.
    """
    if delta is None:
        raise ConfigError(f"{key} is required for a DP guarantee; set it below 1/n, e.g. {key}=1e-5")
    delta = _number(delta, key)
    if not 0.0 < delta < 1.0:
        raise ConfigError(f"{key} = {delta!r} is out of range; it must be in (0, 1) and below 1/n, e.g. 1e-5")
    if num_records is not None:
        if isinstance(num_records, bool) or not isinstance(num_records, int) or num_records < 1:
            raise ValueError(f"num_records must be a positive integer, got {num_records!r}")
        if delta >= 1.0 / num_records:
            raise ConfigError(
                f"{key} = {delta!r} is too large for {num_records} records; it must be < 1/n = "
                f"{1.0 / num_records:.3g} (1/n or more lets a whole record leak), "
                f"e.g. {_suggest_delta(num_records):g}"
            )
    return delta


def _suggest_delta(n: int) -> float:
    """A power of ten at or below ``1 / n**1.1`` (a common choice of delta)."""
    return 10.0 ** math.floor(math.log10(n ** -1.1))


def check_sample_rate(sample_rate: Any, key: str = "sample_rate") -> float:
    """Validate a Poisson sampling rate in (0, 1]; return it as a float."""
    q = _number(sample_rate, key)
    if not 0.0 < q <= 1.0:
        raise ConfigError(
            f"{key} = {sample_rate!r} is out of range; it must be in (0, 1] "
            "(batch size / examples, or clients_per_round / num_clients)"
        )
    return q


def check_noise_multiplier(noise_multiplier: Any, key: str = "dp.noise_multiplier") -> float:
    """Validate a noise multiplier >= 0 (0 means no noise: epsilon is infinite)."""
    sigma = _number(noise_multiplier, key)
    if sigma < 0.0:
        raise ConfigError(f"{key} = {noise_multiplier!r} is out of range; it must be >= 0")
    return sigma


def check_target_epsilon(target_epsilon: Any, key: str = "dp.target_epsilon") -> float:
    """Validate a target epsilon > 0; return it as a float."""
    eps = _number(target_epsilon, key)
    if eps <= 0.0:
        raise ConfigError(f"{key} = {target_epsilon!r} is out of range; it must be > 0")
    return eps


def check_steps(steps: Any, key: str = "steps", minimum: int = 0) -> int:
    """Validate a whole number of steps (or rounds) >= ``minimum``."""
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ConfigError(f"{key} must be an integer, got {steps!r} ({type(steps).__name__})")
    if steps < minimum:
        raise ConfigError(f"{key} = {steps!r} is out of range; it must be >= {minimum}")
    return steps


def check_accountant(name: Any, key: str = "dp.accountant") -> str:
    """Validate an accountant name against the registry; return it."""
    if not isinstance(name, str) or name not in _ACCOUNTANTS:
        raise ConfigError(f"{key} = {name!r} is not valid; choose one of: {', '.join(available_accountants())}")
    return name


def check_relation(relation: Any, accountant: type[Accountant] | None = None) -> str:
    """Validate a neighbouring relation (and that ``accountant`` accounts it); return it."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if accountant is not None and relation not in accountant.relations:
        able = [n for n, cls in sorted(_ACCOUNTANTS.items()) if relation in cls.relations]
        raise ConfigError(
            f"dp.accountant = {accountant.name!r} cannot account the {relation} relation; use one of: {', '.join(able)}"
        )
    return relation


# --- the interface ------------------------------------------------------------


class Accountant(ABC):
    """A history of Poisson-subsampled Gaussian steps and its epsilon.

    Subclasses implement :meth:`_epsilon` (from a non-empty history in which
    every noise multiplier is positive) and are registered with
    :func:`register_accountant`.
    """

    name: ClassVar[str] = ""
    """Registry name (``dp.accountant``), set by :func:`register_accountant`."""
    title: ClassVar[str] = ""
    """Name shown in reports, e.g. ``"RDP"``."""
    relations: ClassVar[tuple[str, ...]] = ("add-remove",)
    """The neighbouring relations this accountant can account."""

    def __init__(self, relation: str = "add-remove") -> None:
        self.relation = check_relation(relation, type(self))
        self._history: list[Segment] = []

    # recording -----------------------------------------------------------

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> Accountant:
        """Record ``steps`` steps of the subsampled Gaussian mechanism.

        Parameters
        ----------
        noise_multiplier : float
            Noise standard deviation over the clipping norm (>= 0).
        sample_rate : float
            Poisson sampling probability of each record, in (0, 1].
        steps : int
            How many such steps (0 records nothing).

        Returns
        -------
        Accountant
            ``self``, so calls can be chained.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        steps = check_steps(steps)
        if steps == 0:
            return self
        if self._history and self._history[-1][:2] == (sigma, q):
            last = self._history[-1]
            self._history[-1] = (sigma, q, last[2] + steps)
        else:
            self._history.append((sigma, q, steps))
        return self

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
                history.append((check_noise_multiplier(s, "noise_multiplier"), check_sample_rate(q, "sample_rate"),
                                check_steps(n, "steps", minimum=1)))
            except ConfigError as exc:
                raise ValueError(f"accountant state, segment {i}: {exc}") from None
        self._history = history

    def copy(self) -> Accountant:
        """An independent accountant of the same kind with the same history."""
        other = type(self)(self.relation)
        other._history = list(self._history)
        return other

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps}, segments={len(self._history)}, relation={self.relation!r})"


# --- registry -----------------------------------------------------------------

A = TypeVar("A", bound=type)

_EPSILONS: dict[tuple, float] = {}
"""Epsilon of (accountant class, relation, history, delta): a pure function, computed once per process."""

_ACCOUNTANTS: dict[str, type[Accountant]] = {}


def register_accountant(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Accountant` subclass as ``dp.accountant = name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"accountant name must be a non-empty string, got {name!r}")

    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Accountant)):
            raise TypeError(f"@register_accountant({name!r}) needs an Accountant subclass, got {cls!r}")
        if name in _ACCOUNTANTS and _ACCOUNTANTS[name] is not cls:
            raise ValueError(f"accountant {name!r} is already registered by {_ACCOUNTANTS[name].__qualname__}")
        cls.name = name
        if not cls.title:
            cls.title = name.upper()
        _ACCOUNTANTS[name] = cls
        return cls

    return deco


def available_accountants() -> list[str]:
    """Sorted names of the registered accountants."""
    return sorted(_ACCOUNTANTS)


def accountant_title(name: str) -> str:
    """Display name of accountant ``name`` (``"RDP"``), or ``name`` upper-cased if unknown."""
    cls = _ACCOUNTANTS.get(name)
    return cls.title if cls is not None else str(name).upper()


def create_accountant(name: str = "rdp", state: Mapping[str, Any] | None = None,
                      relation: str = "add-remove") -> Accountant:
    """A new accountant ``name`` for ``relation``, optionally with the history from ``state``.

    Raises
    ------
    ConfigError
        If ``name`` is not a registered accountant (``dp.accountant``), or it
        cannot account ``relation``.
    ValueError
        If ``state`` is not a valid accountant state.
    """
    acc = _ACCOUNTANTS[check_accountant(name)](relation)
    if state is not None:
        acc.load_state_dict(state)
    return acc


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp", relation: str = "add-remove") -> float:
    """Epsilon after ``steps`` identical steps, with accountant ``accountant`` for ``relation``."""
    return create_accountant(accountant, relation=relation).step(noise_multiplier, sample_rate, steps).epsilon(delta)


# --- the accountants ------------------------------------------------------------

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
        from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

        acc = OpacusPRV()
        acc.history = history
        delta_error = delta / 1000  # opacus's default
        # opacus sizes its grid from the RDP epsilon; with little noise that grid
        # runs to billions of points (and out of memory), so check it first.
        domain = acc._get_domain(
            prvs=[PoissonSubsampledGaussianPRV(q, s) for s, q, _ in history],
            num_self_compositions=[n for _, _, n in history],
            eps_error=self.eps_error,
            delta_error=delta_error,
        )
        if domain.size > self.max_grid_points:
            raise PRVGridTooLarge(
                f"dp.accountant = 'prv' would need a {domain.size:,}-point grid for this history "
                f"({_history_text(history)}), more than {self.max_grid_points:,}; "
                "use dp.accountant = 'rdp' or more noise"
            )
        return acc.get_epsilon(delta=delta, eps_error=self.eps_error, delta_error=delta_error)


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


def _history_text(history: list[Segment] | tuple[Segment, ...]) -> str:
    """``"σ=1.1, q=0.01, 1000 steps; ..."`` for messages."""
    return "; ".join(f"σ={s:g}, q={q:g}, {n} steps" for s, q, n in history)
