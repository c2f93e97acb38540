"""Attacks on the payload a client uploads; each registers itself by name."""

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation
from fedpeft.audit.attacks.registry import available_attacks, get_attack, register_attack

__all__ = ["Attack", "AttackResult", "Observation", "available_attacks", "get_attack", "register_attack"]
