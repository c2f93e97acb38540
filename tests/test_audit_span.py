"""Positive controls of the audit on the real MiniLM (batch 1, no DP, LoRA r=16,
dropout off): the span attack recovers short unseen sentences in both LoRA
regimes, the head inversion recovers the pooled feature, labels are exact;
training-mode dropout and sentences beyond the rank defeat the span test."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.audit.attacks import get_attack
from fedpeft.audit.attacks.lora_span import EmbeddingCandidates, find_embeddings
from fedpeft.audit.metrics import cosine, token_prf
from fedpeft.audit.observe import Truth, observe
from fedpeft.validation import build_strategy, load_config
from fedpeft.data import load_dataset
from fedpeft.models.resident import load_resident_model
from fedpeft.runtime import resident_spec
from strategies import LoRAFactors, Payload

R = 16


@pytest.fixture(scope="module")
def setup(two_torch_threads):
    cfg = load_config(None, ["model.dropout=0", f"peft.r={R}"])
    model = load_resident_model(resident_spec(cfg, 2))
    data = load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction)
    tok = model.tokenizer
    ids = [np.asarray(x) for x in tok(list(data.test_texts), truncation=True, max_length=48)["input_ids"]]
    return cfg, model, build_strategy(cfg), ids, np.asarray(data.test_labels), list(data.test_texts)


def nonzero_b(initial: Payload, seed: int = 0) -> Payload:
    """A global state with B != 0, as after round 1."""
    rng = np.random.default_rng(seed)
    factors = {m: LoRAFactors(f.A, rng.normal(0, 0.02, f.B.shape).astype(np.float32), f.scaling) for m, f in initial.factors.items()}
    return Payload(factors=factors, extras=initial.extras)


def attack_victims(setup, sent, lengths, count, dropout=None, local_steps=1):
    """Span recall, head cosine and label hits over ``count`` test sentences with token counts in ``lengths``."""
    cfg, model, strategy, ids, labels, texts = setup
    special = set(model.tokenizer.all_special_ids)
    picks = [i for i, x in enumerate(ids) if len(x) in lengths][:count]
    assert len(picks) == count
    span, inv, lab = get_attack("lora-span")(), get_attack("linear-inversion")(), get_attack("label-recovery")()
    recalls, cosines, hits = [], [], []
    for v, i in enumerate(picks):
        truth = Truth(ids=[ids[i]], labels=labels[[i]], texts=[texts[i]])
        obs = observe(model, strategy, sent, truth, lr=1e-3, local_steps=local_steps, seed=v, num_labels=2, dropout=dropout)
        obs.extra["max_length"] = 48
        recalls.append(token_prf(span.run(obs).reconstruction["tokens"], ids[i].tolist(), special)[1])
        feats = inv.run(obs).reconstruction["features"]
        cosines.append(cosine(feats["classifier"], truth.head_inputs["classifier"][0]))
        hits.append(lab.run(obs).reconstruction["labels"] == [int(labels[i])])
    return np.array(recalls), np.array(cosines), np.array(hits)


def test_closed_form_candidates_match_the_embedding_layer(setup):
    _, model, *_ = setup
    cand = EmbeddingCandidates.from_model(model.model, positions=5)
    emb = find_embeddings(model.model)
    L = np.random.default_rng(0).normal(size=(3, 384))
    pos = slice(1, 4)
    sigma = cand.sigma(pos)
    z = cand.mapped(L, pos, sigma, cand.word_c @ (L * cand.gamma[None]).T)
    norm2 = cand.sq_norm(pos, sigma)
    with torch.no_grad():
        for v in (0, 101, 2023, 30000):
            for j, p in enumerate(range(1, 4)):
                x = emb.LayerNorm(emb.word_embeddings.weight[v] + emb.position_embeddings.weight[p] + emb.token_type_embeddings.weight[0]).double().numpy()
                np.testing.assert_allclose(z[v, j], L @ x, rtol=1e-6, atol=1e-6)
                assert norm2[v, j] == pytest.approx(x @ x, rel=1e-6)


def test_positive_control_b_nonzero_recovers_sentences_up_to_the_rank(setup):
    recalls, cosines, hits = attack_victims(setup, nonzero_b(setup[1].initial), range(5, R + 1), 12)
    assert recalls.mean() >= 0.9
    assert cosines.min() >= 0.99
    assert hits.all()


def test_positive_control_fresh_round_recovers_sentences_below_the_rank(setup):
    sent = setup[1].initial
    assert all(np.all(f.B == 0) for f in sent.factors.values())
    recalls, cosines, hits = attack_victims(setup, sent, range(5, R), 12)
    assert recalls.mean() >= 0.9
    assert cosines.min() >= 0.99
    assert hits.all()


def test_sentences_beyond_the_rank_defeat_the_span_test(setup):
    recalls, _, hits = attack_victims(setup, nonzero_b(setup[1].initial), range(R + 8, 49), 4)
    assert recalls.mean() < 0.5
    assert hits.all()  # the head still leaks the label


def test_training_mode_dropout_breaks_the_exact_span_test(setup):
    recalls, _, _ = attack_victims(setup, nonzero_b(setup[1].initial), range(5, R + 1), 4, dropout=0.1)
    assert recalls.mean() < 0.5
