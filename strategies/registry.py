"""Name -> strategy class registry, plus ``module:Class`` loading."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, TypeVar

from .base import Strategy

__all__ = ["UnknownStrategyError", "register", "get", "available", "describe"]

S = TypeVar("S", bound=type)

_REGISTRY: dict[str, type[Strategy]] = {}


class UnknownStrategyError(KeyError, ValueError):
    """``strategy.name`` names no registered strategy and no importable
    ``module:Class``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[S], S]:
    """Class decorator: register a :class:`Strategy` subclass under ``name``.

    Examples
    --------
        @strategies.register("my-rule")
        @dataclass
        class MyRule(strategies.Strategy):
            '''One line shown by `fedpeft strategies`.'''
            def aggregate_factors(self, state, updates, weights): ...
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"strategy name must be a non-empty string without ':', got {name!r}")

    def deco(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"@register({name!r}) needs a strategies.Strategy subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(
                f"strategy name {name!r} is already registered by "
                f"{_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Sorted names of the registered strategies."""
    return sorted(_REGISTRY)


def describe() -> list[tuple[str, str]]:
    """``(name, one-line summary)`` for each registered strategy, sorted."""
    return [(n, _REGISTRY[n].summary()) for n in available()]


def get(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``, or loaded from
    ``"package.module:ClassName"``.

    Raises
    ------
    UnknownStrategyError
        The name is not registered, or the import path does not give a
        :class:`Strategy` subclass. The message names ``strategy.name`` and
        the valid choices.
    """
    if isinstance(name, str) and ":" in name:
        return _load(name)
    if name not in _REGISTRY:
        raise UnknownStrategyError(
            f"unknown strategy.name {name!r}; available: {', '.join(available())} "
            f"(or 'package.module:ClassName' for your own)"
        )
    return _REGISTRY[name]


def _load(path: str) -> type[Strategy]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnknownStrategyError(
            f"bad strategy.name {path!r}: expected 'package.module:ClassName'"
        )
    try:
        # Like `python -m`, look in the working directory too, so a user's own
        # package next to their config is found (Flower's Ray workers inherit
        # this process's sys.path).
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownStrategyError(
            f"strategy.name {path!r}: cannot import module {module_name!r} ({e})"
        ) from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UnknownStrategyError(
                f"strategy.name {path!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not (isinstance(obj, type) and issubclass(obj, Strategy)):
        raise UnknownStrategyError(
            f"strategy.name {path!r}: {attr!r} is not a strategies.Strategy subclass"
        )
    return obj
