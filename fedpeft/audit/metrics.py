"""Scores of a reconstruction against the victim's data, and bootstrap intervals.

Token scores treat the batch as a multiset of tokens (order-free); ROUGE-1/2
(rouge-score) and exact recovery also score the order. Every attack number is
reported as a mean over victims with a percentile-bootstrap 95% interval.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np


def token_prf(predicted: Iterable[int], true: Iterable[int], ignore: Iterable[int] = ()) -> tuple[float, float, float]:
    """Multiset precision, recall and F1 of predicted token ids (``ignore``: e.g. special tokens).

    An empty prediction has precision 0 (it recovers nothing), so a silent
    attack never looks precise.
    """
    skip = set(ignore)
    pred = Counter(t for t in predicted if t not in skip)
    gold = Counter(t for t in true if t not in skip)
    hit = sum((pred & gold).values())
    p = hit / sum(pred.values()) if pred else 0.0
    r = hit / sum(gold.values()) if gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=False)


def rouge(predicted: str, reference: str) -> tuple[float, float]:
    """ROUGE-1 and ROUGE-2 F-measures of ``predicted`` against ``reference``."""
    if not predicted.strip() or not reference.strip():
        return 0.0, 0.0
    scores = _scorer().score(reference, predicted)
    return float(scores["rouge1"].fmeasure), float(scores["rouge2"].fmeasure)


def exact_recovery(predicted: Sequence[int], true: Sequence[int], ignore: Iterable[int] = ()) -> float:
    """1.0 if the predicted token sequence equals the true one (``ignore`` dropped), else 0.0."""
    skip = set(ignore)
    return float([t for t in predicted if t not in skip] == [t for t in true if t not in skip])


def label_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Share of the batch's labels the predicted multiset accounts for (exact accuracy at batch 1)."""
    hit = sum((Counter(predicted) & Counter(true)).values())
    return hit / len(true) if len(true) else 0.0


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na and nb else 0.0


def best_cosine(guess: np.ndarray, rows: np.ndarray) -> float:
    """Cosine of ``guess`` with the closest of the batch's true rows."""
    return max(cosine(guess, r) for r in np.atleast_2d(rows))


@dataclass(frozen=True)
class Interval:
    """A mean over victims with its percentile-bootstrap confidence interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of ``values`` and its percentile-bootstrap interval (resampling victims)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Interval(float(x.mean()), float(lo), float(hi), int(x.size))
