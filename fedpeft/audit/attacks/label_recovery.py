"""Label recovery from the classification head's bias gradient (iDLG, Zhao et al. 2020).

With softmax cross-entropy (mean over the batch) the bias gradient is
``mean_i (softmax(z_i) - onehot(y_i))``. For one example only the true class
is negative. For a batch of ``n``, ``n * grad = sum_i p_i - counts``; the
server estimates ``sum_i p_i`` as ``n`` times the model's mean prediction on
its public prior and rounds ``counts`` to a multiset of ``n`` labels.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation
from fedpeft.audit.attacks.registry import register_attack
from fedpeft.audit.scoring import LABEL_METRICS, Pair, ScoreContext, label_scores
from fedpeft.errors import ConfigError


@register_attack("label-recovery")
class LabelRecovery(Attack):
    """Recover the labels (a multiset for batches) from the classifier bias gradient."""

    modalities = ("text", "image")
    recovers = "labels"
    observes = "the classifier's bias gradient"
    summary = "iDLG: its negative entries (one example), its negative mass against the prior's mean prediction (batches)"
    metrics = LABEL_METRICS

    def __init__(self, bias_key: str = "", **params: Any) -> None:
        super().__init__(**params)
        if not isinstance(bias_key, str):
            raise ConfigError(f"audit.label-recovery.bias_key must be a wire key such as 'extra/classifier.bias', got {bias_key!r}")
        self.bias_key = bias_key

    def _key(self, obs: Observation) -> str | None:
        if self.bias_key:
            return self.bias_key if self.bias_key in obs.gradients else None
        # The classifier is the last layer: its bias has one entry per label.
        cands = [k for k, g in obs.gradients.items() if k.endswith(".bias") and g.ndim == 1 and obs.num_labels and g.shape[0] == obs.num_labels]
        return sorted(cands)[-1] if cands else None

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason:
            return reason
        if self._key(obs) is None:
            return "the payload holds no classifier bias gradient of label-set size"
        return None

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        grad = np.asarray(obs.gradients[self._key(obs)], dtype=np.float64)
        n = obs.batch_size
        if n == 1:
            labels = [int(np.argmin(grad))]
        else:
            mean_pred = np.asarray((prior or {}).get("mean_prediction", np.full(grad.shape, 1.0 / grad.size)), dtype=np.float64)
            counts = largest_remainder(n * mean_pred - n * grad, n)
            labels = [int(c) for c, k in enumerate(counts) for _ in range(k)]
        return AttackResult(self.name, {"labels": labels}, {"negative_entries": float((grad < 0).sum())})

    def score(self, result: AttackResult, ctx: ScoreContext) -> dict[str, Pair]:
        return label_scores(result.reconstruction["labels"], ctx)


def largest_remainder(estimate: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integer counts summing to ``total`` closest to ``estimate`` (largest-remainder rounding)."""
    est = np.clip(np.asarray(estimate, dtype=np.float64), 0.0, None)
    if est.sum() <= 0:
        est = np.ones_like(est)
    est = est * (total / est.sum())
    counts = np.floor(est).astype(int)
    for i in np.argsort(-(est - counts))[: total - counts.sum()]:
        counts[i] += 1
    return counts
