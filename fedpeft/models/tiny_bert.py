"""A tiny random-weight BERT on MiniLM's vocabulary, for audits and tests that need the real code path fast.

It learns nothing worth reporting: its point is to run the exact client
(ClientApp train handler, LoRA, opacus DP-SGD) and server code thousands of
times in seconds, as the empirical privacy audit does. The weights are
random (seeded by ``federation.seed``, like every new head); only the
tokenizer comes from the packaged MiniLM.
"""

from __future__ import annotations

from fedpeft.models.registry import freeze, register_model


@register_model(
    "tiny-bert",
    task="classification",
    default_targets=("query", "value"),
    head_modules=("classifier",),
    description="random 2-layer, 32-wide BERT on MiniLM's vocabulary: fast real-code-path audits and tests",
)
def load_tiny_bert(num_labels: int, dropout: float):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedpeft.models.minilm import model_dir

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        classifier_dropout=dropout,
    )
    return freeze(BertForSequenceClassification(config)), tokenizer
