"""A registry of attacks, looked up by name from ``audit.attacks``.

Attacks are classes (subclasses of :class:`fedpeft.audit.attacks.base.Attack`)
registered with a decorator, like strategies::

    @register_attack("lora-span")
    class LoRASpan(Attack):
        ...

Built-in attacks register when :mod:`fedpeft.audit.attacks` is imported;
other packages (the vision attacks) register the same way on import.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from fedpeft.errors import ConfigError

_ATTACKS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register_attack(name: str) -> Callable[[T], T]:
    """Class decorator: register ``cls`` as attack ``name`` and set ``cls.name``."""

    def deco(cls: T) -> T:
        if name in _ATTACKS and _ATTACKS[name] is not cls:
            raise ValueError(f"attack {name!r} is already registered by {_ATTACKS[name].__qualname__}")
        cls.name = name
        _ATTACKS[name] = cls
        return cls

    return deco


def available_attacks() -> list[str]:
    """Names of every registered attack, sorted."""
    _load_builtin()
    return sorted(_ATTACKS)


def get_attack(name: str) -> type:
    """The attack class registered as ``name``; a :class:`ConfigError` names the valid ones."""
    _load_builtin()
    try:
        return _ATTACKS[name]
    except KeyError:
        raise ConfigError(f"audit.attacks: {name!r} is not an attack; choose from: {', '.join(sorted(_ATTACKS))}") from None


def _load_builtin() -> None:
    # Importing the package registers the built-in attacks; a look-up before
    # that import (registry used on its own) must still see them.
    import fedpeft.audit.attacks  # noqa: F401
