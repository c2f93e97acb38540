"""What an attack gets (an :class:`Observation`) and gives back (an :class:`AttackResult`).

An observation is exactly what an honest-but-curious server holds for one
victim client in one round: the global state it sent, the arrays the client
uploaded, the gradient those arrays reveal, the training settings it chose
itself, and its own copy of the architecture. It never holds the victim's
data: the runner keeps the ground truth apart and scores the result.

Nothing here is specific to text: an image model's observation fits the same
fields (``modality`` and ``extra`` carry what differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from fedpeft.errors import ConfigError


@dataclass
class Observation:
    """What the server sees of one victim in one round.

    Parameters
    ----------
    sent : dict[str, np.ndarray]
        The global arrays the server sent the victim, flat wire keys
        (``lora_A/<module>``, ``lora_B/<module>``, ``extra/<name>``).
    uploaded : dict[str, np.ndarray]
        The arrays the victim sent back (same keys as the strategy uploads).
    gradients : dict[str, np.ndarray]
        The gradient of the loss with respect to each trainable tensor, as far
        as the payload reveals it, same keys. Exact when the victim uploads a
        single-step gradient (``exact_gradient``); otherwise the update read as
        a scaled gradient, ``(sent - uploaded) / (lr * local_steps)``.
    exact_gradient : bool
        Whether ``gradients`` is the true single-step gradient.
    lr : float
        Local learning rate (the server chose it).
    local_steps : int
        Local steps the victim ran.
    batch_size : int
        Examples per local step (the server chose it).
    scalings : dict[str, float]
        LoRA scaling ``s`` of each adapted module.
    num_labels : int or None
        Size of the label set if the server knows it (classification), else None.
    model : Any
        The server's own copy of the architecture with ``sent`` loaded
        (for fedpeft's text models a :class:`fedpeft.models.resident.ResidentModel`);
        attacks may run it, never train the victim's data through it.
    modality : str
        ``"text"`` or ``"image"``; attacks check it in :meth:`Attack.applicable`.
    extra : dict
        Anything else the server legitimately knows (e.g. ``tokenizer``,
        image shape, DP noise scale).
    """

    sent: dict[str, np.ndarray]
    uploaded: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    exact_gradient: bool
    lr: float
    local_steps: int
    batch_size: int
    scalings: dict[str, float] = field(default_factory=dict)
    num_labels: int | None = None
    model: Any = None
    modality: str = "text"
    extra: dict[str, Any] = field(default_factory=dict)

    def gradient(self, kind: str, name: str) -> np.ndarray | None:
        """Gradient of one tensor by wire kind and name (``"lora_B"``, module), or None if not uploaded."""
        return self.gradients.get(f"{kind}/{name}")


@dataclass
class AttackResult:
    """What one attack reconstructed for one victim.

    Parameters
    ----------
    attack : str
        Registry name of the attack.
    reconstruction : dict
        The attack's guesses, by kind: ``"tokens"`` (list of token ids, the
        recovered set, ordered), ``"text"`` (str), ``"labels"`` (list of int,
        a multiset for batches), ``"feature"`` (np.ndarray, one row per
        recovered input), ``"images"`` (np.ndarray) ... Metrics score the
        kinds they know.
    diagnostics : dict[str, float]
        Numbers that explain the result (residuals, ranks, seconds).
    """

    attack: str
    reconstruction: dict[str, Any]
    diagnostics: dict[str, float] = field(default_factory=dict)


class Attack:
    """Base class of every attack.

    Subclasses set ``modalities`` and implement :meth:`run`; parameters come
    as keyword arguments from the attack's own ``[audit.<name>]`` table and
    are validated in ``__init__`` (raise ``ConfigError`` naming the key).
    """

    name: ClassVar[str] = "attack"
    modalities: ClassVar[tuple[str, ...]] = ("text", "image")
    summary: ClassVar[str] = ""

    def __init__(self, **params: Any) -> None:
        if params:
            raise ConfigError(f"audit.{self.name}: unknown parameters {sorted(params)}; this attack takes none")

    def applicable(self, obs: Observation) -> str | None:
        """None if the attack can run on ``obs``, else one line saying why not."""
        if obs.modality not in self.modalities:
            return f"{self.name} attacks {'/'.join(self.modalities)} models, not {obs.modality}"
        return None

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        """Reconstruct what the payload reveals; ``prior`` is public side knowledge
        (e.g. token frequencies, label frequencies) the server may hold."""
        raise NotImplementedError


def checked_params(attack: str, params: Mapping[str, Any], defaults: Mapping[str, Any],
                   signed: tuple[str, ...] = ()) -> dict[str, Any]:
    """An attack's ``[audit.<attack>]`` parameters over its defaults, validated.

    Parameters
    ----------
    attack : str
        Registry name (for the error message).
    params : mapping
        What the config gave.
    defaults : mapping
        Every valid parameter and its default; all are numbers.
    signed : tuple of str
        Parameters that may be negative (e.g. a seed).

    Returns
    -------
    dict
        ``{**defaults, **params}``.

    Raises
    ------
    fedpeft.errors.ConfigError
        One line naming an unknown parameter, or a value that is not a
        (non-negative) number.
    """
    unknown = set(params) - set(defaults)
    if unknown:
        raise ConfigError(f"audit.{attack}: unknown parameters {sorted(unknown)}; valid: {sorted(defaults)}")
    merged = {**defaults, **params}
    for key, value in merged.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (key not in signed and value < 0):
            kind = "a number" if key in signed else "a non-negative number"
            raise ConfigError(f"audit.{attack}.{key} = {value!r} must be {kind}")
    return merged


def wire_key(param_name: str) -> str:
    """Flat wire key (``lora_A/<module>``, ``extra/<name>``) of a peft parameter name.

    It lives here, beside the :class:`Observation` whose arrays it names, so
    that both :mod:`fedpeft.audit.observe` and the attack modules (which
    ``observe`` imports through this package) can use it without a cycle.
    """
    # Imported when called: peft is loaded by then, and importing this module stays light.
    from fedpeft.models.lora import PREFIX
    from strategies.state import flat_key

    name = param_name.removeprefix(PREFIX)
    for part in ("A", "B"):
        suffix = f".lora_{part}.default.weight"
        if name.endswith(suffix):
            return flat_key(f"lora_{part}", name[: -len(suffix)])
    return flat_key("extra", name.replace(".modules_to_save.default", ""))
