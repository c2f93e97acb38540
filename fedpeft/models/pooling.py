"""Mean pooling for BERT-family classifiers: the masked mean of the last hidden states.

Sentence-transformers such as all-MiniLM were trained to produce these
features; BERT's own pooler reads the first token through weights that were
never trained for it. Shared by the bundled MiniLM and local BERT folders.
"""

from __future__ import annotations

import torch


class MeanPooler(torch.nn.Module):
    """Masked mean of the last hidden states, in place of BERT's pooler (which sees no attention mask).

    The mask is taken from the call of the encoder it belongs to (a forward pre-hook), so padding never
    enters the mean and a sequence's features do not depend on what it is batched with.
    """

    def __init__(self):
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return hidden_states.mean(1)
        mask = self.mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


MEAN_POOLING_ARCHITECTURES = ("bert",)
"""``config.model_type`` values whose classifier reads ``base_model.pooler`` (BertForSequenceClassification)."""


def use_mean_pooling(model) -> None:
    """Swap the encoder's pooler (``model.bert.pooler``) for a :class:`MeanPooler` fed by its attention mask."""
    pooler = MeanPooler()
    encoder = model.base_model
    encoder.pooler = pooler

    def remember_mask(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        pooler.mask = mask if mask is not None else (args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
