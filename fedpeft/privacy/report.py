"""An honest privacy number: epsilon with its unit, accountant, delta and neighbouring relation.

The run log (``summary.json``'s ``dp`` block), the DP plan and the audit
(``audit.json``'s ``dp`` and ``empirical`` blocks) all state their epsilon
as a :class:`PrivacyReport`, so none can print one without the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedpeft.privacy.accountants import RELATIONS, UNITS, Accountant, Segment, accountant_title
from fedpeft.privacy.validation import check_delta

__all__ = ["PrivacyReport"]


@dataclass(frozen=True)
class PrivacyReport:
    """An (epsilon, delta)-DP guarantee and everything needed to reproduce it.

    Attributes
    ----------
    unit : str
        ``"sample"`` (one training example) or ``"client"`` (all of a client's data).
    accountant : str
        The accountant as reports name it: a registered name (``"rdp"``,
        ``"prv"``, ``"pld"``), possibly followed by a note in parentheses,
        e.g. ``"pld (replace-one)"``.
    delta : float
        The delta of the guarantee.
    noise_multiplier : float or None
        Sigma of every step; None if the history mixes several (see ``history``).
    sample_rate : float or None
        Sampling rate q of every step; None if the history mixes several.
    steps : int
        Total steps (DP-SGD steps for ``"sample"``, rounds for ``"client"``).
    epsilon : float
        The epsilon (an upper bound); ``inf`` if some step had no noise.
    history : tuple of (noise_multiplier, sample_rate, steps)
        The accounted segments, oldest first (not written by :meth:`to_dict`).
    relation : str
        The neighbouring relation as reports write it: one of
        ``"add-remove"`` and ``"replace-one"``, possibly followed by what is
        replaced, e.g. ``"replace-one client"``.
    """

    unit: str
    accountant: str
    delta: float
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    epsilon: float
    history: tuple[Segment, ...] = ()
    relation: str = "add-remove"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        check_delta(self.delta)
        if self.neighbouring_relation not in RELATIONS:
            raise ValueError(f"relation must start with one of {', '.join(RELATIONS)}, got {self.relation!r}")
        object.__setattr__(self, "history", tuple(tuple(seg) for seg in self.history))

    @property
    def neighbouring_relation(self) -> str:
        """The relation's name alone: ``"add-remove"`` or ``"replace-one"``."""
        return self.relation.split(" ", 1)[0]

    @classmethod
    def from_accountant(cls, accountant: Accountant, delta: float, unit: str | None = None,
                        relation: str | None = None) -> PrivacyReport:
        """The report for everything ``accountant`` has recorded, at ``delta``.

        ``unit`` defaults to the accountant's; ``relation`` to its relation's name.
        """
        history = accountant.history
        sigmas = {s for s, _, _ in history}
        rates = {q for _, q, _ in history}
        return cls(
            unit=unit or accountant.unit,
            accountant=accountant.name,
            delta=delta,
            noise_multiplier=sigmas.pop() if len(sigmas) == 1 else None,
            sample_rate=rates.pop() if len(rates) == 1 else None,
            steps=accountant.steps,
            epsilon=accountant.epsilon(delta),
            history=history,
            relation=relation or accountant.relation,
        )

    def to_dict(self) -> dict[str, Any]:
        """The guarantee's fields in ``summary.json`` / ``audit.json`` (``epsilon`` may be ``inf``)."""
        return {
            "unit": self.unit,
            "accountant": self.accountant,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "epsilon": self.epsilon,
            "relation": self.relation,
        }

    def describe(self) -> str:
        """One line, e.g. ``(ε=1.71, δ=1e-05)-DP at the sample level, RDP accountant, σ=1.1, q=0.01, 1000 steps``."""
        what = "steps" if self.unit == "sample" else "rounds"
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:.3g}"
        name, _, note = self.accountant.partition(" ")
        title = accountant_title(name, self.unit) + (f" {note}" if note else "")
        head = f"(ε={eps}, δ={self.delta:g})-DP at the {self.unit} level, {title} accountant"
        if self.steps == 0:
            return f"{head}, no {what} yet"
        if self.noise_multiplier is not None and self.sample_rate is not None:
            return f"{head}, σ={self.noise_multiplier:g}, q={self.sample_rate:g}, {self.steps} {what}"
        if not self.history:
            return f"{head}, {self.steps} {what}"
        parts = "; ".join(f"σ={s:g}, q={q:g}, {n} {what}" for s, q, n in self.history)
        return f"{head}, {self.steps} {what} in {len(self.history)} segments ({parts})"
