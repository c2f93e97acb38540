"""The server's prior: what it knows from public data alone, and the guesses it makes without the payload.

Every attack number in an audit sits beside a *prior-only baseline*: the
same metric for the guess a server makes from public data without looking at
the victim's payload. :class:`Prior` holds that public knowledge (token and
label frequencies of public training rows, the global model's mean outputs
on them) and makes the guesses: the majority label (the label prior's counts
for a batch), the most frequent public tokens, the mean public head input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.audit.attacks.label_recovery import largest_remainder
from fedpeft.audit.observe import capture_head_inputs

PRIOR_FORWARD_ROWS = 64  # public rows run through the model for its mean outputs: a sample is enough for a mean


@dataclass
class Prior:
    """What the server knows without the payload (from public data).

    Attributes
    ----------
    token_ranking : list of int
        Content tokens of the public rows, most frequent first.
    label_freq : np.ndarray
        Label frequencies of the public rows.
    mean_prediction : np.ndarray
        The global model's mean softmax on public rows.
    mean_features : dict[str, np.ndarray]
        Mean input of each trained head layer on public rows.
    """

    token_ranking: list[int]
    label_freq: np.ndarray
    mean_prediction: np.ndarray
    mean_features: dict[str, np.ndarray]

    def for_attacks(self) -> dict[str, Any]:
        """The part of the prior attacks may use (side knowledge, not baselines)."""
        return {"token_ranking": self.token_ranking, "label_freq": self.label_freq, "mean_prediction": self.mean_prediction}

    def label_guess(self, n: int) -> list[int]:
        """The prior-only labels of a batch of ``n`` (:func:`prior_labels`)."""
        return prior_labels(self.label_freq, n)

    def token_guess(self, n: int) -> list[int]:
        """The prior-only tokens of a text of ``n`` content tokens: the ``n`` most frequent public ones."""
        return self.token_ranking[:n]

    def feature_guess(self, layer: str, like: np.ndarray) -> np.ndarray:
        """The prior-only input of head layer ``layer``: its public mean (zeros shaped ``like`` if unknown)."""
        return self.mean_features.get(layer, np.zeros_like(like))


def prior_labels(label_freq: np.ndarray, n: int) -> list[int]:
    """The prior-only label guess for a batch of ``n``: the majority label for one, the label prior's counts for more."""
    if n == 1:
        return [int(np.argmax(label_freq))]
    counts = largest_remainder(n * np.asarray(label_freq), n)
    return [c for c, k in enumerate(counts) for _ in range(k)]


@torch.no_grad()
def build_prior(rt, sent, public: np.ndarray, special: set[int]) -> Prior:
    """Token ranking and label frequencies of the ``public`` rows, and the model's mean outputs on them.

    Parameters
    ----------
    rt : fedpeft.runtime.Runtime
        The loaded text model and data.
    sent : Payload
        The global state the server sent (loaded for the forward passes).
    public : np.ndarray
        Indices of the public training rows.
    special : set of int
        Token ids left out of the ranking (specials).
    """
    split, _ = rt.splits
    counts = Counter(int(t) for i in public for t in split.ids[i] if int(t) not in special)
    label_freq = np.bincount(split.labels[public], minlength=rt.data.num_labels) / len(public)
    model = rt.model
    model.set_payload(sent)
    rows = public[:PRIOR_FORWARD_ROWS]
    feats: dict[str, list[np.ndarray]] = {}
    preds = []
    for start in range(0, len(rows), PRIOR_FORWARD_ROWS):
        idx = rows[start : start + PRIOR_FORWARD_ROWS]
        seen: dict[str, np.ndarray] = {}
        batch = split.subset(idx).batch(np.arange(len(idx)), "classification", model.device)
        with capture_head_inputs(model, seen):
            logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        preds.append(torch.softmax(logits, -1).cpu().numpy())
        for k, v in seen.items():
            feats.setdefault(k, []).append(v)
    return Prior(
        token_ranking=[t for t, _ in counts.most_common()],
        label_freq=label_freq,
        mean_prediction=np.concatenate(preds).mean(0),
        mean_features={k: np.concatenate(v).mean(0) for k, v in feats.items()},
    )
