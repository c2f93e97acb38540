"""Gradient-matching attacks on the LoRA+head payload: images (IG, DLG) and text (embedding inversion).

Small budgets keep this file fast (few victims, few iterations); the
20-victim numbers with intervals are in the README/report, and the longer
checks here are marked slow.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft.audit.attacks import get_attack
from fedpeft.audit.attacks.base import Observation
from fedpeft.audit.attacks.dlg import deep_leakage
from fedpeft.audit.attacks.gradient_matching import (
    client_upload,
    head_bias_key,
    payload_gradients,
    recover_labels,
    trainable_tensors,
)
from fedpeft.audit.attacks.inverting_gradients import invert_gradients
from fedpeft.audit.vision.experiment import run_image_attack
from fedpeft.audit.vision.model import lora_cnn
from fedpeft.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlora(one_torch_thread):
    return lora_cnn("digits", r=4)


def _victim(vlora, i: int, n: int = 1):
    x = torch.from_numpy(np.array(vlora.data.private_images[i : i + n]))
    y = torch.from_numpy(np.array(vlora.data.private_labels[i : i + n]))
    return x, y


def _loss(x, y):
    return lambda m: nn.functional.cross_entropy(m(x), y)


def test_payload_gradient_holds_exactly_the_trainable_tensors(vlora):
    x, y = _victim(vlora, 0)
    grads = payload_gradients(vlora.model, _loss(x, y)(vlora.model))
    assert set(grads) == set(trainable_tensors(vlora.model))
    assert all(k.startswith(("lora_A/", "lora_B/", "extra/head.")) for k in grads)
    # A fresh adapter (B = 0): A's gradient is zero, B's and the head's are not.
    assert float(grads["lora_A/conv1"].abs().max()) == 0.0 and float(grads["lora_B/conv1"].abs().max()) > 0.0


def test_label_recovery_is_exact_for_single_examples(vlora):
    for i in range(20):
        x, y = _victim(vlora, i)
        g = client_upload(vlora.model, _loss(x, y))
        assert recover_labels(g[head_bias_key(g, 10)].numpy(), 1) == [int(y)]


def test_label_recovery_for_batches_finds_most_labels(vlora):
    from fedpeft.audit.vision.experiment import _multiset_hits

    hits = 0
    for i in range(20):
        x, y = _victim(vlora, 2 * i, 2)
        g = client_upload(vlora.model, _loss(x, y))
        labels = recover_labels(g[head_bias_key(g, 10)].numpy(), 2)
        assert len(labels) == 2
        hits += _multiset_hits(labels, y.tolist())
    assert hits / 40 >= 0.85  # measured 0.93 over 30 batches; a confident model hides repeated labels


def test_inverting_gradients_beats_the_prior_image(vlora):
    psnr, ssim, base_psnr = [], [], []
    from fedpeft.audit import image_metrics

    prior = vlora.data.mean_image()
    for i in range(3):
        x, y = _victim(vlora, i)
        g = client_upload(vlora.model, _loss(x, y))
        rec, info = invert_gradients(vlora.model, g, [int(y)], vlora.shape, iterations=1000, seed=i)
        assert rec.shape == x.shape and float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0
        s, b = image_metrics.score_batch(rec, x), image_metrics.score_prior(prior, x)
        psnr += s.psnr.tolist()
        ssim += s.ssim.tolist()
        base_psnr += b.psnr.tolist()
    assert np.mean(psnr) > np.mean(base_psnr) + 3.0
    assert np.mean(ssim) > 0.6


def test_dlg_beats_the_prior_image(vlora):
    s = run_image_attack("dlg", victims=3, vlora=vlora, iterations=20)
    assert s.label_accuracy == 1.0
    assert np.mean(s.psnr) > np.mean(s.baseline_psnr) + 6.0
    assert np.mean(s.ssim) > np.mean(s.baseline_ssim) + 0.2


def test_noise_payload_gives_nothing_beyond_the_prior(vlora):
    # Negative control: the same attack on a payload of pure noise.
    s = run_image_attack("inverting-gradients", victims=2, vlora=vlora, noise_only=True, iterations=200)
    assert np.mean(s.psnr) <= np.mean(s.baseline_psnr)


def test_multi_step_update_read_as_a_scaled_gradient_still_leaks(vlora):
    s = run_image_attack("dlg", victims=3, vlora=vlora, local_steps=5, client_lr=0.1, iterations=20)
    assert np.mean(s.psnr) > np.mean(s.baseline_psnr) + 3.0


def _image_observation(vlora, x, y) -> Observation:
    sent = {k: p.detach().numpy().copy() for k, p in trainable_tensors(vlora.model).items()}
    grads = {k: g.numpy() for k, g in client_upload(vlora.model, _loss(x, y)).items()}
    uploaded = {k: sent[k] - 0.1 * grads[k] for k in sent}
    return Observation(sent=sent, uploaded=uploaded, gradients=grads, exact_gradient=True, lr=0.1, local_steps=1,
                       batch_size=len(y), num_labels=10, model=vlora.model, modality="image",
                       extra={"image_shape": vlora.shape})


def test_registered_image_attacks_run_on_an_observation(vlora):
    x, y = _victim(vlora, 3)
    obs = _image_observation(vlora, x, y)
    for name, params in (("inverting-gradients", {"iterations": 50}), ("dlg", {"iterations": 3})):
        attack = get_attack(name)(**params)
        assert attack.applicable(obs) is None
        result = attack.run(obs)
        assert result.reconstruction["images"].shape == (1, 1, 8, 8)
        assert result.reconstruction["labels"] == [int(y)]
    text_obs = Observation(sent={}, uploaded={}, gradients={}, exact_gradient=True, lr=0.1, local_steps=1, batch_size=1)
    assert "image" in get_attack("dlg")().applicable(text_obs)
    with pytest.raises(ConfigError, match="iterationz"):
        get_attack("inverting-gradients")(iterationz=3)
    # Only the trainable tensors' gradients are used; one missing is an error, not a silent zero.
    del obs.gradients["lora_B/fc"]
    with pytest.raises(ValueError, match="lora_B/fc"):
        get_attack("dlg")(iterations=1).run(obs)


def test_attack_leaves_the_model_as_sent(vlora):
    before = {n: p.detach().clone() for n, p in vlora.model.named_parameters()}
    x, y = _victim(vlora, 5)
    deep_leakage(vlora.model, client_upload(vlora.model, _loss(x, y)), [int(y)], vlora.shape, iterations=2)
    assert all(torch.equal(p, before[n]) for n, p in vlora.model.named_parameters())


@pytest.mark.slow
def test_batch_of_two_with_best_matching_beats_the_prior(vlora):
    # Batch 2 (batch 4 does not beat the prior at this budget; see the report).
    s = run_image_attack("dlg", victims=4, batch_size=2, vlora=vlora, iterations=20)
    assert s.label_accuracy >= 0.75
    assert np.mean(s.psnr) > np.mean(s.baseline_psnr) + 2.0


# --- text: MiniLM, LoRA r=16 on query/value + head, dropout 0 -------------------------------------------


@pytest.fixture(scope="module")
def minilm(one_torch_thread):
    from fedpeft.validation import load_config
    from fedpeft.models.resident import load_resident_model
    from fedpeft.runtime import resident_spec

    cfg = load_config(None, ["peft.r=16", "model.dropout=0"])
    resident = load_resident_model(resident_spec(cfg, 2))
    resident.model.eval()
    return resident


def _text_payload(resident, text: str, label: int):
    enc = resident.tokenizer(text, return_tensors="pt")
    g = client_upload(resident.model, lambda m: m(**enc, labels=torch.tensor([label])).loss)
    return enc["input_ids"][0].tolist(), g


def test_sequence_length_is_read_off_the_lora_gradient_rank(minilm):
    from fedpeft.audit.attacks.embedding_inversion import estimate_num_tokens

    for text in ("a chilling movie.", "uneven but a lot of fun, and smart"):
        ids, g = _text_payload(minilm, text, 1)
        assert estimate_num_tokens({k: v.numpy() for k, v in g.items()}) == (len(ids), True)


def test_true_tokens_match_their_own_gradient_and_eager_attention_is_restored(minilm):
    from fedpeft.audit.attacks import embedding_inversion as tei

    ids, g = _text_payload(minilm, "a chilling movie.", 0)
    base = minilm.model.get_base_model()
    before = base.config._attn_implementation
    # Refinement alone, with the truth among the candidates at every position, must land on it.
    tokens, info = tei.invert_text_embeddings(minilm.model, minilm.tokenizer, g, 0, len(ids), iterations=0,
                                              candidates=1, prior_tokens=ids[1:-1], sweeps=2)
    assert base.config._attn_implementation == before
    assert tokens == ids[1:-1]
    assert info["refined_loss"] < 1e-4


@pytest.mark.slow
def test_embedding_inversion_beats_the_token_prior(minilm):
    from collections import Counter

    from fedpeft.audit.attacks import embedding_inversion as tei
    from fedpeft.audit.metrics import token_prf
    from fedpeft.data import load_dataset

    tok = minilm.tokenizer
    public = load_dataset("rotten_tomatoes", test_fraction=0.1).train_texts[:2000]
    counts = Counter(t for ids in tok(list(public), add_special_tokens=False)["input_ids"] for t in ids)
    ranking = [t for t, _ in counts.most_common(10)]
    # The first short test-split victims of the 20-victim audit (unseen by the prior).
    texts = ("Sweet, soothingly paced French film.", "a pretentious mess", "Brimming with energy and spirit.",
             "The Sweetest Thing leaves an awful sour taste.")
    f1, base = [], []
    for i, text in enumerate(texts):
        ids, g = _text_payload(minilm, text, 1)
        tokens, _ = tei.invert_text_embeddings(minilm.model, tok, g, 1, len(ids), seed=i, prior_tokens=ranking)
        f1.append(token_prf(tokens, ids[1:-1])[2])
        base.append(token_prf(ranking[: len(ids) - 2], ids[1:-1])[2])
    assert np.mean(f1) > np.mean(base) + 0.05
