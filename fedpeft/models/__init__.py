"""Base models (a registry of loaders) and the LoRA adapters fedpeft trains on them."""

from fedpeft.models.registry import ModelSpec, available_models, get_model_spec, register_model

# Built-in models: importing a module registers it.
from fedpeft.models import minilm, smollm2, tiny_bert  # noqa: E402,F401  (isort: skip)

__all__ = ["ModelSpec", "available_models", "get_model_spec", "register_model"]
