"""Scoring: what each attack metric means, its value for one victim beside the prior-only baseline, and the intervals.

An attack declares the metrics it reports (:class:`Metric`: name, unit,
direction, the baseline it is compared with) and scores each victim with
:meth:`fedpeft.audit.attacks.base.Attack.score`, which returns ``metric ->
(attack value, baseline value)``. The functions here are the scorers the
built-in attacks share, one per kind of reconstruction (labels, head inputs,
tokens), and :func:`metric_table` turns a metric's per-victim pairs into
means with percentile-bootstrap intervals over victims
(:func:`fedpeft.audit.metrics.bootstrap_ci`).

The baselines come from :class:`fedpeft.audit.priors.Prior`, what the server
knows without the payload; this module only asks it for its guesses.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from fedpeft.audit.metrics import best_cosine, bootstrap_ci, exact_recovery, label_accuracy, rouge, token_prf

if TYPE_CHECKING:  # type hints only: the prior and the truth are built by the runner
    from fedpeft.audit.observe import Truth
    from fedpeft.audit.priors import Prior

Pair = tuple[float, float]  # (attack value, prior-only baseline value) for one victim


@dataclass(frozen=True)
class Metric:
    """One number an attack reports per victim, beside a prior-only baseline.

    Parameters
    ----------
    name : str
        The metric's name in ``audit.json`` and ``audit.md``. A family of
        metrics names its varying part in braces, e.g. ``"cosine {layer}
        input"`` (one metric per head layer).
    unit : str
        What the number measures, e.g. ``"share of the victim's tokens"``, ``"dB"``.
    baseline : str
        What the prior-only baseline guesses without looking at the payload.
    higher_is_better : bool
        Direction for the attacker: True when a larger value means more leakage.
    """

    name: str
    unit: str
    baseline: str
    higher_is_better: bool = True

    def matches(self, name: str) -> bool:
        """Whether ``name`` is this metric (or a member of its family)."""
        parts = re.split(r"\{[^}]*\}", self.name)
        return re.fullmatch(".+".join(map(re.escape, parts)), name) is not None


LABEL_METRICS = (
    Metric("label accuracy", "share of the batch's labels recovered (a multiset for batches)",
           "the majority public label (the label prior's counts for batches)"),
)
FEATURE_METRICS = (
    Metric("cosine {layer} input", "cosine similarity with the closest true input of that head layer",
           "the mean input of that layer on public rows"),
)
_TOKEN_BASELINE = "the most frequent public tokens, as many as the victim has"
TOKEN_METRICS = (
    Metric("token precision", "share of the recovered tokens that are the victim's (multiset, specials left out)", _TOKEN_BASELINE),
    Metric("token recall", "share of the victim's tokens recovered (multiset, specials left out)", _TOKEN_BASELINE),
    Metric("token F1", "harmonic mean of token precision and recall", _TOKEN_BASELINE),
    Metric("ROUGE-1", "ROUGE-1 F-measure of the decoded recovery against the victim's text", _TOKEN_BASELINE),
    Metric("ROUGE-2", "ROUGE-2 F-measure of the decoded recovery against the victim's text", _TOKEN_BASELINE),
    Metric("exact recovery", "share of victims whose text is recovered exactly (in order at batch 1, as a multiset for batches)",
           _TOKEN_BASELINE),
)
IMAGE_METRICS = (
    Metric("PSNR (dB)", "dB, per image after the best matching of reconstructions to originals", "the public mean image"),
    Metric("SSIM", "structural similarity, per image after the same matching", "the public mean image"),
    Metric("label accuracy", "share of the images' labels recovered (order-free)", "the label prior (majority label; its counts for batches)"),
)


@dataclass(frozen=True)
class ScoreContext:
    """What scoring one victim may use: its private data, the server's prior and the tokenizer.

    Attacks never see this; only their results are scored against it.
    """

    truth: Truth
    prior: Prior
    tokenizer: Any
    special: frozenset[int]

    @classmethod
    def of(cls, truth: Truth, prior: Prior, tokenizer) -> "ScoreContext":
        return cls(truth, prior, tokenizer, frozenset(tokenizer.all_special_ids))


def label_scores(labels: Sequence[int], ctx: ScoreContext) -> dict[str, Pair]:
    """``label accuracy`` of recovered ``labels`` and of the prior's guess (:data:`LABEL_METRICS`)."""
    true = ctx.truth.labels.tolist()
    base = ctx.prior.label_guess(len(true))
    return {"label accuracy": (label_accuracy(list(labels), true), label_accuracy(base, true))}


def feature_scores(features: Mapping[str, np.ndarray], ctx: ScoreContext) -> dict[str, Pair]:
    """``cosine <layer> input`` of each recovered head input and of the mean public input (:data:`FEATURE_METRICS`).

    Layers the victim's model has no recorded input for are left out.
    """
    out = {}
    for layer, guess in features.items():
        if layer in ctx.truth.head_inputs:
            true = ctx.truth.head_inputs[layer]
            base = ctx.prior.feature_guess(layer, like=guess)
            out[f"cosine {layer} input"] = (best_cosine(guess, true), best_cosine(base, true))
    return out


def token_scores(tokens: Sequence[int], ctx: ScoreContext, positions: Sequence[int] | None = None) -> dict[str, Pair]:
    """:data:`TOKEN_METRICS` of recovered ``tokens`` (at ``positions``, if known) and of the prior's guess.

    The baseline is told the victim's number of content tokens (generous to
    it) and guesses that many of the most frequent public tokens.
    """
    truth, special = ctx.truth, ctx.special
    true_ids = [int(t) for x in truth.ids for t in x]
    content = [t for t in true_ids if t not in special]
    guess = list(tokens)
    base = ctx.prior.token_guess(len(content))
    reference = " ".join(truth.texts)
    out = dict(zip(("token precision", "token recall", "token F1"),
                   zip(token_prf(guess, true_ids, special), token_prf(base, true_ids, special))))
    r_att = rouge(ctx.tokenizer.decode([t for t in guess if t not in special]), reference)
    r_base = rouge(ctx.tokenizer.decode(base), reference)
    out["ROUGE-1"] = (r_att[0], r_base[0])
    out["ROUGE-2"] = (r_att[1], r_base[1])
    order = positions if positions is not None else range(len(guess))
    ordered = [t for _, t in sorted(zip(order, guess), key=lambda x: x[0])]
    # One sentence: its order is known, so exact means in order; a batch is a multiset of tokens.
    exact = (exact_recovery(ordered, true_ids, special) if len(truth.ids) == 1 else
             float(Counter(t for t in guess if t not in special) == Counter(content)))
    out["exact recovery"] = (exact, exact_recovery(base, true_ids, special))
    return out


def token_example(tokens: Sequence[int], ctx: ScoreContext, victim: int) -> dict[str, Any]:
    """A recovered-text example for the report: the victim's text, its wordpieces with the recovered ones in bold."""
    special = ctx.special
    return {"victim": victim, "text": " / ".join(ctx.truth.texts), "marked": marked_text(tokens, ctx),
            "recovered": ctx.tokenizer.decode([t for t in tokens if t not in special])}


def marked_text(tokens: Sequence[int], ctx: ScoreContext) -> str:
    """The victim's wordpieces with the recovered ones in **bold** (markdown)."""
    special = ctx.special
    left = Counter(t for t in tokens if t not in special)
    words = []
    for x in ctx.truth.ids:
        for t in (int(v) for v in x):
            if t in special:
                continue
            piece = ctx.tokenizer.convert_ids_to_tokens([t])[0].replace("*", "\\*")
            if left[t] > 0:
                left[t] -= 1
                words.append(f"**{piece}**")
            else:
                words.append(piece)
    return " ".join(words)


def metric_table(per_metric: Mapping[str, Sequence[Pair]], seed: int) -> dict[str, dict[str, dict]]:
    """``metric -> {"attack": interval, "baseline": interval}``, bootstrap intervals over victims."""
    return {m: {"attack": bootstrap_ci([p[0] for p in pairs], seed=seed).to_dict(),
                "baseline": bootstrap_ci([p[1] for p in pairs], seed=seed).to_dict()}
            for m, pairs in per_metric.items()}


LENGTH_BUCKETS = (8, 16, 24, 32, 48, 512)


def by_length(rows: Sequence[Mapping[str, Any]], metric_key: str) -> list[dict]:
    """Mean of one per-victim metric (``"<attack>: <metric>"``) by the victim batch's token count (specials included).

    The report shows it for the study attack's recall (the span attack's
    token recall); each bucket's value is stored under ``"recall"``.
    """
    out = []
    lo = 0
    for hi in LENGTH_BUCKETS:
        vals = [r["metrics"][metric_key] for r in rows if metric_key in r["metrics"] and lo < r["tokens"] <= hi]
        if vals:
            out.append({"tokens": f"{lo + 1}-{hi}", "victims": len(vals), "recall": bootstrap_ci(vals).to_dict()})
        lo = hi
    return out
