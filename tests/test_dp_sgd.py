"""Sample-level DP-SGD on the real LoRA model: per-sample gradients, clipping, noise, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.validation import load_config
from fedpeft.errors import ConfigError
from fedpeft.privacy.dp_sgd import DPSGD, check_private_model, grad_sample_module, per_sample_loss, poisson_batches
from fedpeft.runtime import runtime
from fedpeft.training import train_steps
from tests.test_models import random_payload


@pytest.fixture(scope="module")
def rt():
    # Dropout off, so a batched forward and one-example forwards see the same function.
    return runtime(load_config(None, ["model.dropout=0.0", "peft.r=4", "data.max_test_examples=64"]))


pytestmark = pytest.mark.usefixtures("restore_resident")  # tests/conftest.py


def _reference_grads(model, split, idx, task):
    """Each example's gradient, computed alone: the ground truth opacus must match."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in idx:
        batch = split.batch([i], task)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_loss(logits, batch, task).sum()
        out.append([g.detach().clone() for g in torch.autograd.grad(loss, params)])
    return params, out


@pytest.mark.parametrize("freeze_a", [False, True], ids=["A-and-B", "B-only"])
def test_opacus_per_sample_grads_equal_one_at_a_time_reference(rt, freeze_a):
    rt.model.set_payload(random_payload(rt.model.initial, seed=0))  # B != 0, so A has gradients too
    model = rt.model.model
    model.train()
    split, _ = rt.splits
    idx = rt.shards[0][:5]
    frozen = []
    if freeze_a:  # FFA-LoRA: a frozen factor must get no grad sample, the others still right
        frozen = [p for n, p in model.named_parameters() if "lora_A" in n]
        for p in frozen:
            p.requires_grad_(False)
    try:
        params, reference = _reference_grads(model, split, idx, rt.model.task)
        assert params, "nothing trainable"
        batch = split.batch(idx, rt.model.task)
        with grad_sample_module(model) as gsm:
            loss = per_sample_loss(gsm(batch["input_ids"], batch["attention_mask"]), batch, rt.model.task).mean()
            loss.backward()
            for k, p in enumerate(params):
                got = p.grad_sample
                assert got.shape == (len(idx), *p.shape)
                want = torch.stack([ref[k] for ref in reference])
                scale = want.abs().max()
                assert scale > 0, "a trainable tensor with zero gradient makes the check vacuous"
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(scale))
        assert all(not hasattr(p, "grad_sample") for p in model.parameters()), "hooks' state left behind"
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.eval()
        rt.model.set_payload(rt.model.initial)


def test_poisson_batches_have_the_planned_rate_and_may_be_empty():
    rng = np.random.default_rng(0)
    batches = poisson_batches(np.arange(1000), 400, 0.02, rng)
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - 20) < 1.0
    assert sizes.std() > 2  # variable, not fixed
    assert all(len(set(b)) == len(b) for b in batches)
    tiny = poisson_batches(np.arange(10), 200, 0.05, np.random.default_rng(1))
    assert any(len(b) == 0 for b in tiny)


def test_dp_training_is_secret_unless_the_user_supplies_the_secret(rt):
    """The seed is public: it must not fix DP-SGD's batches or noise. Only a user's secret does."""
    from fedpeft.privacy.secret import SecretSource

    split, _ = rt.splits
    shard = rt.shards[0][:64]

    def run(seed, secret=None):
        rt.model.set_payload(rt.model.initial)
        m = train_steps(rt.model.model, split, shard, task=rt.model.task, steps=3, batch_size=8, lr=1e-2,
                        weight_decay=0.0, seed=seed, dp=DPSGD(1.0, 1.0, 8 / 64), secret=secret)
        return m, rt.model.payload().arrays()

    m1, a = run(5)
    _, b = run(5)
    assert m1["steps"] == 3 and 0 < m1["mean_batch_size"] < 64
    assert any(not np.array_equal(a[k], b[k]) for k in a), "the public seed reproduced a DP-SGD run"
    mine = SecretSource(entropy=12345, origin="test")
    _, c = run(5, mine)
    _, d = run(5, mine)
    _, e = run(6, mine)
    assert all(np.array_equal(c[k], d[k]) for k in c), "same secret and seed, different result"
    assert any(not np.array_equal(c[k], e[k]) for k in c)
    rt.model.set_payload(rt.model.initial)


def test_trainable_embeddings_are_refused(rt):
    emb = rt.model.model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    try:
        with pytest.raises(ConfigError, match="trainable embeddings"):
            check_private_model(rt.model.model)
    finally:
        emb.weight.requires_grad_(False)


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp-sgd"])
def test_sgd_optimizer_takes_exactly_minus_lr_times_the_gradient(rt, private):
    """train.optimizer = "sgd" (no momentum): the step is -lr times the batch gradient, which under DP-SGD
    with sigma = 0 and every example sampled is the mean of the clipped per-example gradients."""
    rt.model.set_payload(random_payload(rt.model.initial, seed=1))
    model = rt.model.model
    split, _ = rt.splits
    idx = np.asarray(rt.shards[0][:6])
    params, per_example = _reference_grads(model, split, idx, rt.model.task)
    clip = 0.05
    if private:
        scaled = [[g * min(1.0, clip / float(torch.sqrt(sum((x ** 2).sum() for x in ex)))) for g in ex] for ex in per_example]
        want = [sum(ex[j] for ex in scaled) / len(idx) for j in range(len(params))]
    else:
        want = [sum(ex[j] for ex in per_example) / len(idx) for j in range(len(params))]
    before = [p.detach().clone() for p in params]
    train_steps(model, split, idx, task=rt.model.task, steps=1, batch_size=len(idx), lr=0.1, weight_decay=0.0,
                seed=0, sampling="shuffle", dp=DPSGD(0.0, clip, 1.0) if private else None, optimizer="sgd")
    for p, b, g in zip(params, before, want):
        torch.testing.assert_close(p.detach() - b, -0.1 * g, rtol=1e-3, atol=1e-7)
    rt.model.set_payload(rt.model.initial)


@pytest.mark.parametrize("sigma", [0.0, 2.0])
def test_an_empty_poisson_draw_still_takes_a_noise_only_step_of_the_right_scale(rt, sigma):
    """A rate so small that every draw is empty: each step must still count and add
    N(0, (sigma C / B)^2) to every trainable coordinate's gradient (skipping it would
    tell the server the batch was empty, which depends on whose records are there).
    With plain SGD the weights move by exactly -lr times that noise: nothing at sigma 0,
    lr sigma C sqrt(steps) / B per coordinate at sigma 2."""
    split, _ = rt.splits
    before = {k: v.copy() for k, v in rt.model.payload().arrays().items()}
    steps, batch_size, clip, lr = 4, 8, 0.5, 0.1
    metrics = train_steps(rt.model.model, split, rt.shards[0][:64], task=rt.model.task, steps=steps,
                          batch_size=batch_size, lr=lr, weight_decay=0.0, seed=0, dp=DPSGD(sigma, clip, 1e-12),
                          optimizer="sgd")
    assert metrics["steps"] == steps and metrics["mean_batch_size"] == 0.0
    assert np.isnan(metrics["train_loss"])  # no example was seen: there is no loss to report
    after = rt.model.payload().arrays()
    moved = np.concatenate([(after[k] - before[k]).ravel() for k in before]).astype(np.float64)
    assert moved.size == rt.model.trainable_params
    if sigma == 0.0:
        assert np.all(moved == 0.0)
    else:
        assert np.all(moved != 0.0), "a trainable coordinate got no noise"
        assert moved.mean() == pytest.approx(0.0, abs=5 * moved.std() / np.sqrt(moved.size))
        assert moved.std() == pytest.approx(lr * sigma * clip * np.sqrt(steps) / batch_size, rel=0.02)
