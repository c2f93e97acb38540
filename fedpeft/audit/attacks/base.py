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

from fedpeft.audit.scoring import Metric, Pair, ScoreContext
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

    Subclasses set ``modalities``, declare what they recover and the metrics
    they report, and implement :meth:`run` and :meth:`score`; parameters come
    as keyword arguments from the attack's own ``[audit.<name>]`` table and
    are validated in ``__init__`` (raise ``ConfigError`` naming the key).

    Attributes
    ----------
    name : str
        Registry name (set by :func:`~fedpeft.audit.attacks.registry.register_attack`).
    modalities : tuple of str
        Models it attacks: ``"text"``, ``"image"``.
    recovers : str
        What it reconstructs, e.g. ``"labels"`` (``fedpeft attacks`` shows it).
    observes : str
        From what part of the payload, e.g. ``"the classifier's bias gradient"``.
    summary : str
        The method in a few words.
    metrics : tuple of Metric
        Every metric :meth:`score` returns, with its unit, direction and baseline.
    study_metric : str
        The declared metric that marks a study saturated when it reaches 0
        (harder settings of that study are skipped) and that the report breaks
        down by sentence length; "" = none.
    """

    name: ClassVar[str] = "attack"
    modalities: ClassVar[tuple[str, ...]] = ("text", "image")
    recovers: ClassVar[str] = ""
    observes: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()
    study_metric: ClassVar[str] = ""

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

    def score(self, result: AttackResult, ctx: ScoreContext) -> dict[str, Pair]:
        """``metric -> (attack value, prior-only baseline value)`` of one victim, for the declared :attr:`metrics`.

        ``ctx`` holds the victim's data and the server's prior; the scorers of
        :mod:`fedpeft.audit.scoring` compute the built-in metrics. Image
        attacks are scored by the image experiment against the original
        pixels (:mod:`fedpeft.audit.image_audit`), not here.
        """
        raise NotImplementedError(f"attack {self.name!r} declares no score(); it cannot run on text victims")

    def example(self, result: AttackResult, ctx: ScoreContext, victim: int) -> dict[str, Any] | None:
        """A recovered-text example for the report (``victim``, ``text``, ``marked``, ``recovered``), or None."""
        return None

    @classmethod
    def metric(cls, name: str) -> Metric | None:
        """The declared metric ``name`` is (or belongs to), or None."""
        return next((m for m in cls.metrics if m.matches(name)), None)

    @classmethod
    def describe(cls) -> str:
        """One line: what it recovers, from what, and how (``fedpeft attacks``)."""
        what = f"{cls.recovers} from {cls.observes}" if cls.recovers and cls.observes else cls.recovers or cls.observes
        parts = [p for p in (what, cls.summary) if p]
        if not parts:  # a user attack that declares nothing: its docstring's first line
            parts = [(cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""]
        return "; ".join(parts)


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
