"""What fedpeft needs to know about a base model: :class:`ModelSpec`, shared by the registry and model folders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

Task = Literal["classification", "causal_lm"]


@dataclass(frozen=True)
class ModelSpec:
    """How to load one base model.

    Parameters
    ----------
    name : str
        ``model.name``: a registry name or the path of a model folder.
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
    architecture : str
        transformers' ``model_type`` of a model folder ("" for the bundled models), for error messages.
    """

    name: str
    task: Task
    default_targets: tuple[str, ...]
    head_modules: tuple[str, ...]
    load: Callable
    description: str
    poolings: tuple[str, ...] = ()
    architecture: str = ""


def freeze(model):
    """Freeze every parameter and switch to eval mode; adapters re-enable theirs."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
