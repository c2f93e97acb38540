"""The ``[audit]`` table: its keys, defaults and validation.

``Config.audit`` is a free table, so this module is the one place that knows
its keys; every mistake becomes a one-line :class:`ConfigError` naming the key
and what would be valid, before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fedpeft.errors import ConfigError

DEFAULT_ATTACKS = ("label-recovery", "linear-inversion", "lora-span")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class AuditSettings:
    """Resolved ``audit.*`` keys.

    Attributes
    ----------
    attacks : tuple of str
        Registered attack names to run.
    victims : int
        Victim clients per experiment (bootstrap CIs are over victims; 20 or more).
    batch_size : int
        Examples the victim holds and trains on per step (its whole local data).
    round : int
        1 = a fresh round (the seeded initial adapter, LoRA ``B = 0``); k > 1 =
        the global state after k - 1 rounds, approximated by (k - 1) *
        ``train.local_steps`` steps on public training data.
    local_steps : int
        Local steps of the victim; 1 means it uploads its single-step gradient.
    optimizer : {"sgd", "adamw"}
        The victim's local optimiser when ``local_steps > 1`` (adamw is what
        ``fedpeft run`` clients use).
    victim_texts : str
        File of victim sentences, one per line (optionally ``<label><TAB><text>``);
        empty = unseen sentences from the test split.
    max_victim_tokens : int
        Only use victim sentences of at most this many tokens, specials included
        (0 = any length up to ``model.max_length``).
    studies : bool
        Also run the positive control and the studies that vary it: recovery
        vs batch size, sentence length beyond the rank, dropout, local steps.
    study_victims : int
        Victims per study experiment (the main experiment and the positive
        control get ``victims``).
    empirical : bool
        Also run the canary audit: an empirical epsilon lower bound of the
        configured DP mechanism beside the accountant's epsilon.
    canary_trials : int
        Canary audit trials with the canary, and as many without.
    confidence : float
        Confidence of the empirical lower bound (Clopper-Pearson).
    prior_examples : int
        Public training rows the server uses as its prior (token and label
        frequencies, mean features).
    params : dict
        Per-attack parameters: ``[audit.<attack-name>]`` sub-tables.
    """

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    victims: int = 20
    batch_size: int = 1
    round: int = 1
    local_steps: int = 1
    optimizer: str = "sgd"
    victim_texts: str = ""
    max_victim_tokens: int = 0
    studies: bool = True
    study_victims: int = 8
    prior_examples: int = 2000
    empirical: bool = True
    canary_trials: int = 1000
    confidence: float = 0.95
    params: dict[str, dict[str, Any]] = field(default_factory=dict)


_INTS = {"victims": 1, "batch_size": 1, "round": 1, "local_steps": 1, "max_victim_tokens": 0, "prior_examples": 10, "study_victims": 1, "canary_trials": 10}


def parse_settings(table: Mapping[str, Any]) -> AuditSettings:
    """Validate ``cfg.audit`` and fill in defaults."""
    from fedpeft.audit.attacks import available_attacks, get_attack

    names = set(AuditSettings.__dataclass_fields__) - {"params"}
    values: dict[str, Any] = {}
    params: dict[str, dict[str, Any]] = {}
    attack_names = set(available_attacks())
    for key, value in table.items():
        if key in attack_names:
            if not isinstance(value, dict):
                raise ConfigError(f"audit.{key} must be a table of that attack's parameters, got {value!r}")
            params[key] = dict(value)
            continue
        if key not in names:
            raise ConfigError(
                f"unknown key audit.{key}; valid keys: {', '.join(sorted(names))} (or an attack's sub-table: {', '.join(sorted(attack_names))})"
            )
        values[key] = _check(key, value)
    settings = AuditSettings(**values, params=params)
    for name in settings.attacks:
        get_attack(name)  # unknown name: ConfigError listing the valid ones
    for name, given in params.items():
        get_attack(name)(**given)  # bad parameters fail here, before the audit folder exists
    return settings


def _check(key: str, value: Any) -> Any:
    full = f"audit.{key}"
    if key in _INTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < _INTS[key]:
            raise ConfigError(f"{full} must be an integer >= {_INTS[key]}, got {value!r}")
        return value
    if key == "attacks":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{full} must be a non-empty list of attack names, got {value!r}")
        return tuple(value)
    if key == "optimizer":
        if value not in OPTIMIZERS:
            raise ConfigError(f"{full} = {value!r} is not valid; choose one of: {', '.join(OPTIMIZERS)}")
        return value
    if key == "confidence":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.5 <= value < 1.0:
            raise ConfigError(f"{full} must be a number in [0.5, 1), e.g. 0.95, got {value!r}")
        return float(value)
    if key in ("studies", "empirical"):
        if not isinstance(value, bool):
            raise ConfigError(f"{full} must be true or false, got {value!r}")
        return value
    if key == "victim_texts":
        if not isinstance(value, str):
            raise ConfigError(f"{full} must be a path to a text file, got {value!r}")
        if value and not Path(value).is_file():
            raise ConfigError(f"{full} = {value!r}: no such file")
        return value
    raise AssertionError(key)  # every name in AuditSettings is handled above
