"""Analytic input recovery for a trained linear layer with a bias.

For ``y = W x + b`` and one example, ``dL/dW = delta x^T`` and
``dL/db = delta``, so every row ``j`` with ``delta_j != 0`` gives
``x = (dL/dW)_j / (dL/db)_j``. The least-squares form over all rows,
``x = dW^T db / ||db||^2``, is the same for one example and the
``delta``-weighted mean of the inputs for a batch. In BERT's head this
recovers the [CLS] hidden state (input of ``pooler.dense``) and the pooled
feature (input of ``classifier``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation
from fedpeft.audit.attacks.registry import register_attack
from fedpeft.audit.scoring import FEATURE_METRICS, Pair, ScoreContext, feature_scores


def invert_linear(weight_grad: np.ndarray, bias_grad: np.ndarray) -> np.ndarray:
    """The input of a linear layer from its weight and bias gradients (exact for one example)."""
    db = np.asarray(bias_grad, dtype=np.float64)
    denom = float(db @ db)
    if denom == 0.0:
        return np.zeros(weight_grad.shape[1])
    return np.asarray(weight_grad, dtype=np.float64).T @ db / denom


@register_attack("linear-inversion")
class LinearInversion(Attack):
    """Recover the input of every uploaded linear layer that has a bias (the trained head)."""

    modalities = ("text", "image")
    recovers = "the input of each trained linear layer with a bias (the head)"
    observes = "its weight and bias gradients"
    summary = "x = dW^T db / |db|^2, exact at batch 1"
    metrics = FEATURE_METRICS

    def layers(self, obs: Observation) -> list[str]:
        """Wire names (``extra/<layer>``) of layers with both weight and bias gradients."""
        out = []
        for key, g in obs.gradients.items():
            if key.endswith(".weight") and g.ndim == 2:
                bias = key[: -len(".weight")] + ".bias"
                if bias in obs.gradients and obs.gradients[bias].shape == (g.shape[0],):
                    out.append(key[: -len(".weight")])
        return sorted(out)

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason:
            return reason
        return None if self.layers(obs) else "the payload holds no linear layer with weight and bias gradients"

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        features = {}
        for layer in self.layers(obs):
            name = layer.split("/", 1)[1]
            features[name] = invert_linear(obs.gradients[layer + ".weight"], obs.gradients[layer + ".bias"])
        return AttackResult(self.name, {"features": features}, {"layers": float(len(features))})

    def score(self, result: AttackResult, ctx: ScoreContext) -> dict[str, Pair]:
        return feature_scores(result.reconstruction["features"], ctx)
