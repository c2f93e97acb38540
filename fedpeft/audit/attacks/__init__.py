"""Attacks on the payload a client uploads; each registers itself by name."""

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation
from fedpeft.audit.attacks.registry import available_attacks, get_attack, register_attack

# Built-in attacks: importing a module registers it.
from fedpeft.audit.attacks import label_recovery, linear_inversion, lora_span  # noqa: E402,F401  (isort: skip)

__all__ = ["Attack", "AttackResult", "Observation", "available_attacks", "get_attack", "register_attack"]
