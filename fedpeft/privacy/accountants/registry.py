"""Registered accountants: ``@register_accountant(name)`` and lookup by ``dp.accountant``.

Names are per unit: ``dp.accountant = "rdp"`` is opacus's Poisson RDP for
sample-level DP-SGD and dp-accounting's sampled-without-replacement RDP for
client-level DP, because the unit's sampling decides which analysis applies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from fedpeft.errors import ConfigError
from fedpeft.privacy.accountants.base import RELATIONS, UNITS, Accountant

__all__ = ["register_accountant", "available_accountants", "accountant_class", "accountant_title",
           "check_accountant", "check_relation", "create_accountant", "compute_epsilon"]

A = TypeVar("A", bound=type)

_ACCOUNTANTS: dict[tuple[str, str], type[Accountant]] = {}
"""``(unit, name)`` -> accountant class."""


def register_accountant(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Accountant` subclass as ``dp.accountant = name`` for its ``unit``.

    Raises
    ------
    ValueError
        If ``name`` is empty, or already taken for that unit by another class.
    TypeError
        If the decorated object is not an ``Accountant`` subclass.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"accountant name must be a non-empty string, got {name!r}")

    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Accountant)):
            raise TypeError(f"@register_accountant({name!r}) needs an Accountant subclass, got {cls!r}")
        if cls.unit not in UNITS:
            raise ValueError(f"{cls.__qualname__}.unit must be one of {UNITS}, got {cls.unit!r}")
        key = (cls.unit, name)
        if key in _ACCOUNTANTS and _ACCOUNTANTS[key] is not cls:
            raise ValueError(f"accountant {name!r} is already registered by {_ACCOUNTANTS[key].__qualname__}")
        cls.name = name
        if not cls.title:
            cls.title = name.upper()
        _ACCOUNTANTS[key] = cls
        return cls

    return deco


def available_accountants(unit: str = "sample") -> list[str]:
    """Sorted names of the accountants registered for ``unit``."""
    return sorted(name for u, name in _ACCOUNTANTS if u == unit)


def check_accountant(name: Any, key: str = "dp.accountant", unit: str = "sample") -> str:
    """Validate an accountant name against the registry for ``unit``; return it.

    Raises
    ------
    ConfigError
        Naming ``key`` and the valid choices.
    """
    if not isinstance(name, str) or (unit, name) not in _ACCOUNTANTS:
        raise ConfigError(f"{key} = {name!r} is not valid; choose one of: {', '.join(available_accountants(unit))}")
    return name


def accountant_class(name: str, unit: str = "sample") -> type[Accountant]:
    """The class registered as ``name`` for ``unit`` (ConfigError naming the valid ones otherwise)."""
    return _ACCOUNTANTS[(unit, check_accountant(name, unit=unit))]


def accountant_title(name: str, unit: str = "sample") -> str:
    """Display name of accountant ``name`` (``"RDP"``), or ``name`` upper-cased if unknown."""
    cls = _ACCOUNTANTS.get((unit, name))
    return cls.title if cls is not None else str(name).upper()


def check_relation(relation: Any, accountant: type[Accountant] | None = None) -> str:
    """Validate a neighbouring relation (and that ``accountant`` accounts it); return it."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    if accountant is not None and relation not in accountant.relations:
        able = [n for (u, n), cls in sorted(_ACCOUNTANTS.items()) if u == accountant.unit and relation in cls.relations]
        raise ConfigError(
            f"dp.accountant = {accountant.name!r} cannot account the {relation} relation; use one of: {', '.join(able)}"
        )
    return relation


def create_accountant(name: str = "rdp", state: Mapping[str, Any] | None = None, relation: str = "add-remove",
                      *, unit: str = "sample", **settings: Any) -> Accountant:
    """A new accountant ``name`` of ``unit`` for ``relation``, optionally with the history from ``state``.

    Parameters
    ----------
    name : str
        ``dp.accountant``.
    state : mapping, optional
        A saved :meth:`Accountant.state_dict`.
    relation : {"add-remove", "replace-one"}
        The neighbouring relation.
    unit : {"sample", "client"}
        Which registry to look ``name`` up in.
    **settings
        Passed to the accountant's constructor (client level:
        ``num_clients`` and ``clients_per_round``).

    Raises
    ------
    ConfigError
        If ``name`` is not a registered accountant (``dp.accountant``), or it
        cannot account ``relation``.
    ValueError
        If ``state`` is not a valid accountant state.
    """
    cls = accountant_class(name, unit)
    acc = cls(check_relation(relation, cls), **settings)
    if state is not None:
        acc.load_state_dict(state)
    return acc


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp", relation: str = "add-remove") -> float:
    """Epsilon after ``steps`` identical sample-level steps, with accountant ``accountant`` for ``relation``."""
    return create_accountant(accountant, relation=relation).step(noise_multiplier, sample_rate, steps).epsilon(delta)
