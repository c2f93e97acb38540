"""Attacks on the payload a client uploads; each registers itself by name."""

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation, checked_params, wire_key
from fedpeft.audit.attacks.registry import available_attacks, build_attacks, describe_attacks, get_attack, register_attack

# Built-in attacks: importing a module registers it.
from fedpeft.audit.attacks import (  # noqa: E402,F401  (isort: skip)
    dlg,
    embedding_inversion,
    inverting_gradients,
    label_recovery,
    linear_inversion,
    lora_span,
)

__all__ = [
    "Attack", "AttackResult", "Observation", "checked_params", "wire_key",
    "available_attacks", "build_attacks", "describe_attacks", "get_attack", "register_attack",
]
