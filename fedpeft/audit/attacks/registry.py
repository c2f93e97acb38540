"""A registry of attacks, looked up by name from ``audit.attacks``, plus ``module:Class`` loading.

Attacks are classes (subclasses of :class:`fedpeft.audit.attacks.base.Attack`)
registered with a decorator, like strategies::

    @register_attack("lora-span")
    class LoRASpan(Attack):
        ...

Built-in attacks register when :mod:`fedpeft.audit.attacks` is imported,
which Python does before it imports this module; other packages register
the same way on import. A user's own attack needs no
registration: ``audit.attacks = ["my_package.my_module:MyAttack"]`` imports
it, as ``strategy.name`` does for strategies.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Callable, TypeVar

from fedpeft.audit.attacks.base import Attack
from fedpeft.errors import ConfigError

if TYPE_CHECKING:  # type hints only: the config sits below the audit
    from fedpeft.config import AuditConfig

_ATTACKS: dict[str, type] = {}

T = TypeVar("T", bound=type)

USER_ATTACK = "'package.module:ClassName' for your own"


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
    return sorted(_ATTACKS)


def describe_attacks() -> list[tuple[str, str]]:
    """``(name, one line: what it recovers, from what, how)`` for each registered attack, sorted."""
    return [(name, _ATTACKS[name].describe()) for name in available_attacks()]


def get_attack(name: str) -> type:
    """The attack class registered as ``name``, or loaded from ``"package.module:ClassName"``.

    Raises
    ------
    fedpeft.errors.ConfigError
        The name is not registered, or the import path does not give an
        :class:`~fedpeft.audit.attacks.base.Attack` subclass; the message
        names ``audit.attacks`` and the valid choices.
    """
    if isinstance(name, str) and ":" in name:
        return _load(name)
    try:
        return _ATTACKS[name]
    except KeyError:
        raise ConfigError(
            f"audit.attacks: {name!r} is not an attack; choose from: {', '.join(sorted(_ATTACKS))} (or {USER_ATTACK})"
        ) from None


def build_attacks(audit: AuditConfig) -> list[Attack]:
    """The attacks ``audit.attacks`` names, each built with its ``[audit.<name>]`` parameters.

    Every parameter table is checked, also those of attacks not in the list,
    so a typo fails here, before an audit folder exists.

    Raises
    ------
    fedpeft.errors.ConfigError
        An unknown attack (in the list or as a parameter table), or a bad parameter.
    """
    classes = {entry: get_attack(entry) for entry in audit.attacks}
    for entry, cls in classes.items():
        if not cls.metrics:
            raise ConfigError(f"audit.attacks {entry!r}: {cls.__qualname__} declares no metrics; set its `metrics` to the "
                              "fedpeft.audit.scoring.Metric values its score() returns")
    by_name = {cls.name: entry for entry, cls in classes.items()}
    for key, params in audit.params.items():
        if key not in classes and key not in by_name:
            if key not in _ATTACKS:
                raise ConfigError(f"unknown table [audit.{key}]: {key!r} is neither a registered attack "
                                  f"({', '.join(sorted(_ATTACKS))}) nor an entry of audit.attacks")
            _ATTACKS[key](**params)  # bad parameters: ConfigError
    return [cls(**audit.params.get(entry, audit.params.get(cls.name, {}))) for entry, cls in classes.items()]


def _load(path: str) -> type:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"bad audit.attacks entry {path!r}: expected 'package.module:ClassName'")
    try:
        # Like `python -m`, look in the working directory too, so a user's own
        # package next to their config is found.
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"audit.attacks {path!r}: cannot import module {module_name!r} ({e})") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"audit.attacks {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, Attack)):
        raise ConfigError(f"audit.attacks {path!r}: {attr!r} is not a fedpeft.audit.attacks.Attack subclass")
    if obj.name == Attack.name:  # not registered under a name of its own: the report calls it by its path
        obj.name = path
    return obj

