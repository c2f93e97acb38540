"""Name -> loader registry for datasets, with a per-process cache."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

from fedpeft.data.local import DataColumns, is_dataset_file, load_local_dataset
from fedpeft.data.types import TextClassificationData
from fedpeft.errors import ConfigError

Loader = Callable[[int, float], TextClassificationData]

_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register a dataset loader under ``name``.

    Parameters
    ----------
    name : str
        The value users put in ``data.dataset``.

    Returns
    -------
    Callable
        Decorator for a function ``loader(seed, test_fraction)`` that returns a
        :class:`TextClassificationData`.

    Raises
    ------
    ValueError
        If ``name`` is already registered.
    """

    def decorator(loader: Loader) -> Loader:
        if name in _LOADERS:
            raise ValueError(f"dataset {name!r} is already registered")
        _LOADERS[name] = loader
        return loader

    return decorator


def available_datasets() -> list[str]:
    """Return the registered dataset names, sorted."""
    return sorted(_LOADERS)


def load_dataset(name: str, seed: int = 0, test_fraction: float = 0.1, *, columns: DataColumns | None = None,
                 task: str = "classification") -> TextClassificationData:
    """Load a registered dataset or a local dataset file with a fixed, seeded train/test split.

    Parameters
    ----------
    name : str
        A name from :func:`available_datasets`, or the path of a dataset file
        or saved ``datasets`` folder (config key ``data.dataset``; see
        :mod:`fedpeft.data.local`).
    seed : int, default 0
        Seed of the label-stratified train/test split. Keep the default: it is
        deliberately not the federation seed, so that runs with different
        federation seeds are scored on the same test set.
    test_fraction : float, default 0.1
        Fraction of the rows held out for testing, in (0, 1).
    columns : DataColumns, optional
        A dataset file's columns (``data.text_column``, ...); default
        :class:`DataColumns` (``text``, ``label``). Ignored for registered names.
    task : {"classification", "causal_lm"}, default "classification"
        The model's task, which says which columns a dataset file needs.

    Returns
    -------
    TextClassificationData
        The same (immutable) object for the same arguments within a process.

    Raises
    ------
    ConfigError
        If the name is unknown or ``test_fraction`` is out of range.
    AssetError
        If the package that ships the data is missing or broken.
    """
    if name not in _LOADERS and not is_dataset_file(name):
        raise ConfigError(
            f"data.dataset: unknown dataset {name!r}; valid choices: "
            f"{', '.join(available_datasets())}, or the path of a dataset file"
        )
    fraction = float(test_fraction)
    if not (math.isfinite(fraction) and 0.0 < fraction < 1.0):
        raise ConfigError(f"data.test_fraction: must be in (0, 1), got {test_fraction!r}")
    if name not in _LOADERS:
        return load_local_dataset(name, task=task, columns=columns or DataColumns(), seed=int(seed),
                                  test_fraction=fraction)
    # Normalise before the cache so load_dataset(n) and load_dataset(n, 0) share an entry.
    return _load_cached(name, int(seed), fraction)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, seed: int, test_fraction: float) -> TextClassificationData:
    return _LOADERS[name](seed, test_fraction)
