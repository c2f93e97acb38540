"""Sample-level DP-SGD on the batched engine equals the sequential opacus client, client for client.

Two levels. The per-example gradients the stacked layers record for each
client (LoRA A and B, linear heads, a non-linear head through torch.func)
equal each example's gradient computed alone by autograd, in float64, for
clients of different batch sizes including one whose Poisson draw is empty.
Then whole DP-SGD runs: with the secret source replaced by randomness keyed
by public values (so both runs draw the same batches and the same noise),
K clients trained together upload what each uploads trained alone by
:func:`train_steps` with opacus, which checks clipping, noise (its order,
shapes and generator) and normalisation at once; the negative controls show
the comparison catches a wrong clipping norm and noise drawn in another
order.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

import fedpeft.models.stacked_lora as stacked_lora
from fedpeft.models.stacked_lora import StackedLoRA
from fedpeft.privacy import secret as secret_module
from fedpeft.privacy.dp_sgd import DPSGD, per_sample_loss, poisson_batches
from fedpeft.privacy.secret import SecretSource
from fedpeft.privacy.stacked_dp import StackedGradSamples
from fedpeft.runtime import runtime
from fedpeft.training.batched import per_example_grads, train_clients_batched
from fedpeft.training.client_dropout import ClientDropout
from fedpeft.training.loop import local_schedule, train_steps
from fedpeft.validation import load_config
from tests.test_batched import EXACT, assert_same, dropout_on, float64, random_payload

SMALL = ["model.dropout=0.0", "peft.dropout=0.0", "model.max_length=16", "data.max_test_examples=16"]


def ffa(module: str) -> dict[str, bool]:
    """FFA-LoRA's ``trainable``: every A frozen, B and the head trained."""
    return {"A": False, "B": True}


@pytest.fixture(scope="module")
def rt(one_torch_thread):
    return runtime(load_config(None, SMALL))


pytestmark = pytest.mark.usefixtures("restore_resident")  # tests/conftest.py


def public_generator(self, purpose, *key):
    """Randomness keyed by public values only: both runs of a comparison draw the same batches and noise."""
    return np.random.default_rng([secret_module._purpose_code(purpose), *(int(k) for k in key)])


@pytest.fixture
def replayable_secret(monkeypatch) -> SecretSource:
    monkeypatch.setattr(SecretSource, "generator", public_generator)
    return SecretSource()


# --- per-example gradients --------------------------------------------------------------------------------------


def one_at_a_time(resident, split, payload, idx, task, trainable=None):
    """Each example of ``idx`` alone through client ``payload``'s model: its loss and the gradient of every
    trainable parameter (in the model's parameter order), by plain autograd."""
    resident.set_payload(payload, trainable=trainable)
    model = resident.model
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in idx:
        batch = split.batch([i], task)
        loss = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch, task).sum()
        out.append((float(loss.detach()), [g.detach().clone() for g in torch.autograd.grad(loss, params)]))
    return [p.shape for p in params], out


def batched_per_example(resident, split, payloads, chosen, task, trainable=None):
    """The batched engine's per-example gradients for blocks ``chosen``: (stack, recorder, row losses)."""
    stack = StackedLoRA(resident, payloads, trainable=trainable)
    samples = StackedGradSamples(len(stack))
    net = resident.model
    dropout = ClientDropout(net, list(range(len(payloads))), "cpu")
    net.train()
    try:
        with stack.applied(samples), dropout.applied():
            rows = per_example_grads(net, split, chosen, task, "cpu", "float32", dropout)
    finally:
        net.eval()
    return stack, samples, rows.detach()


def poisson_blocks(shards, rates, seed):
    """One Poisson draw per client, as a DP step draws it."""
    rng = np.random.default_rng(seed)
    return [poisson_batches(shard, 1, q, rng)[0] for shard, q in zip(shards, rates)]


def check_per_example(resident, split, payloads, chosen, task, trainable=None):
    stack, samples, rows = batched_per_example(resident, split, payloads, chosen, task, trainable)
    keys = stack.trained_keys()
    for k, (payload, idx) in enumerate(zip(payloads, chosen)):
        if len(idx) == 0:  # an empty draw: no row, no gradient (its step will be noise only)
            assert all(int(torch.count_nonzero(samples.grads[key][k])) == 0 for key in keys)
            assert int(torch.count_nonzero(rows[k])) == 0
            continue
        shapes, reference = one_at_a_time(resident, split, payload, idx, task, trainable)
        assert [tuple(stack.clients[k].tensor(key).shape) for key in keys] == [tuple(s) for s in shapes]
        np.testing.assert_allclose(rows[k, : len(idx)].numpy(), [loss for loss, _ in reference], rtol=1e-10)
        for j, key in enumerate(keys):
            got = samples.grads[key][k]
            want = torch.stack([grads[j] for _, grads in reference])
            scale = float(want.abs().max())
            assert scale > 0, f"{key}: zero gradient would make the check vacuous"
            torch.testing.assert_close(got[: len(idx)], want, rtol=1e-8, atol=1e-11 * scale, msg=f"client {k} {key}")
            assert int(torch.count_nonzero(got[len(idx):])) == 0, "filler rows must carry no gradient"
    return keys


@pytest.mark.parametrize("trainable", [None, ffa], ids=["A-B-and-linear-heads", "frozen-A"])
def test_per_example_gradients_equal_each_example_alone(rt, trainable):
    split, _ = rt.splits
    shards = [rt.shards[i][:n] for i, n in enumerate((30, 12, 4, 20))]
    chosen = poisson_blocks(shards, (0.2, 0.2, 0.1, 0.15), seed=3)
    sizes = [len(c) for c in chosen]
    assert 0 in sizes and len({n for n in sizes if n}) > 1, sizes  # an empty draw, and unequal blocks (filler rows)
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3, 4)]
    with float64(rt.model):
        keys = check_per_example(rt.model, split, payloads, chosen, rt.model.task, trainable)
    kinds = {key[0] for key in keys}
    assert kinds == ({"B", "head"} if trainable else {"A", "B", "head"})
    assert ("head", "bert.pooler.dense", "weight") in keys and ("head", "classifier", "bias") in keys


def test_per_example_gradients_of_a_head_that_is_not_a_linear_layer(one_torch_thread):
    """``modules_to_save = ["bert.pooler", "classifier"]``: BertPooler (dense + tanh), through torch.func."""
    rt = runtime(load_config(None, [*SMALL, 'peft.modules_to_save=["bert.pooler", "classifier"]']))
    split, _ = rt.splits
    assert not isinstance(rt.model.model.get_submodule("base_model.model.bert.pooler").modules_to_save["default"],
                          torch.nn.Linear)
    chosen = [np.asarray(rt.shards[0][:3]), np.array([], dtype=np.int64), np.asarray(rt.shards[2][:2])]
    payloads = [random_payload(rt.model.initial, s) for s in (5, 6, 7)]
    try:
        with float64(rt.model):
            keys = check_per_example(rt.model, split, payloads, chosen, rt.model.task)
    finally:
        rt.model.set_payload(rt.model.initial)
    assert ("head", "bert.pooler", "dense.weight") in keys


# --- whole DP-SGD runs -------------------------------------------------------------------------------------------

SIZES, SEEDS = (12, 8, 20), [5, 6, 7]
BATCH = 2
TRAIN = dict(steps=3, batch_size=BATCH, lr=3e-3, weight_decay=0.01)


def mechanisms(clip: float = 2.0, sigma: float = 1.0, sizes=SIZES) -> list[DPSGD]:
    """Each client's mechanism at its own q = batch / shard size, as the server's DP plan sets it."""
    return [DPSGD(sigma, clip, min(1.0, BATCH / n)) for n in sizes]


def dp_both_ways(rt, secret, payloads, dp, *, batched_dp=None, dtype=torch.float64, trainable=None, sizes=SIZES,
                 seeds=SEEDS, **train):
    """(sequential opacus, batched) DP-SGD results; ``batched_dp`` replaces the batched run's mechanisms."""
    split, _ = rt.splits
    shards = [rt.shards[i][:n] for i, n in enumerate(sizes)]
    kw = dict(task=rt.model.task, **(train or TRAIN))
    with float64(rt.model) if dtype == torch.float64 else nullcontext():
        seq = []
        for shard, seed, payload, mechanism in zip(shards, seeds, payloads, dp):
            rt.model.set_payload(payload, trainable=trainable)
            losses: list[float] = []
            metrics = train_steps(rt.model.model, split, shard, seed=seed, dp=mechanism, secret=secret,
                                  step_losses=losses, rank_padding=rt.model.rank_padding(), **kw)
            seq.append((metrics, rt.model.payload(), losses))
        together = train_clients_batched(rt.model, split, shards, seeds, payloads, dp=batched_dp or dp, secret=secret,
                                         trainable=trainable, **kw)
    return seq, together


def test_the_clients_draws_include_an_empty_one_and_unequal_batches(rt, replayable_secret):
    """What the runs below rely on: the replayable secret gives client 0 empty draws while the others train."""
    sizes = [[len(b) for b in local_schedule(rt.shards[i][:n], steps=3, batch_size=BATCH, seed=s, dp=m,
                                             secret=replayable_secret)]
             for i, (n, s, m) in enumerate(zip(SIZES, SEEDS, mechanisms()))]
    assert 0 in sizes[0] and all(0 not in s for s in sizes[1:]), sizes
    assert len({n for s in sizes for n in s}) > 2, sizes


@pytest.mark.parametrize("case", ["adamw", "sgd-momentum", "frozen-A", "dropout-on", "mixed-ranks"])
def test_batched_dp_sgd_uploads_what_each_client_uploads_alone(rt, replayable_secret, case):
    ranks = (4, 8, 2) if case == "mixed-ranks" else (None, None, None)
    payloads = [random_payload(rt.model.initial, s, rank=r) for s, r in zip((1, 2, 3), ranks)]
    train = dict(TRAIN)
    if case == "sgd-momentum":
        train.update(optimizer="sgd", momentum=0.9, lr=0.05)
    trainable = ffa if case == "frozen-A" else None
    with dropout_on(rt.model) if case == "dropout-on" else nullcontext():
        seq, together = dp_both_ways(rt, replayable_secret, payloads, mechanisms(), trainable=trainable, **train)
    assert_same(seq, together, **EXACT)
    # Every step counts under DP: client 0's empty draws were noise-only steps that still moved its upload.
    assert [r.metrics["steps"] for r in together] == [3.0] * 3
    assert len(together[0].losses) < 3
    for payload, result in zip(payloads, together):
        moved = [k for k, v in payload.arrays().items() if not np.array_equal(v, result.payload.arrays()[k])]
        expected = {k for k in payload.arrays() if not (trainable and k.startswith("lora_A"))}
        assert set(moved) == expected, sorted(expected - set(moved))[:3]


def test_dp_noise_on_the_rank_padding_is_zeroed_so_a_low_rank_client_trains_its_own_rank(rt, replayable_secret):
    """A rank-4 client in the rank-8 resident model: DP-SGD noises every coordinate, padding included; the
    optimizer zeroes the padding after each step, so nothing outside the client's rank-4 upload shapes its model."""
    split, _ = rt.splits
    payload = random_payload(rt.model.initial, 1, rank=4)
    kw = dict(task=rt.model.task, seed=SEEDS[0], dp=mechanisms()[1], secret=replayable_secret, **TRAIN)

    def padding_after(rank_padding: bool) -> float:
        rt.model.set_payload(payload)
        padded = rt.model.rank_padding()
        assert len(padded) == len(payload.factors) and all(r == 4 for _, _, r in padded)
        train_steps(rt.model.model, split, rt.shards[1][:SIZES[1]], rank_padding=padded if rank_padding else (), **kw)
        return max(max(float(A[r:].detach().abs().max()), float(B[:, r:].detach().abs().max())) for A, B, r in padded)

    assert padding_after(rank_padding=False) > 1e-4  # the noise does land there: the check below is not vacuous
    assert padding_after(rank_padding=True) == 0.0


def test_float32_batched_dp_sgd_matches_to_float32_rounding(rt, replayable_secret):
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    seq, together = dp_both_ways(rt, replayable_secret, payloads, mechanisms(), dtype=torch.float32)
    assert_same(seq, together)


def test_bfloat16_autocast_batched_dp_sgd_stays_within_what_bfloat16_itself_changes(rt, replayable_secret):
    """Under ``model.dtype = "bfloat16"`` opacus forms each per-example gradient in bfloat16 and casts it to
    float32; the batched path forms it in float32 from the same bfloat16 activations. So the two round apart,
    and the claim is about size: per client, batching moves the upload by less than 1.5 times what bfloat16
    moves the sequential upload against float32 (measured: 0.004 to 0.99 times), and far less than the update."""
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    split, _ = rt.splits
    shards = [rt.shards[i][:n] for i, n in enumerate(SIZES)]
    kw = dict(task=rt.model.task, **TRAIN)

    def alone(dtype):
        out = []
        for shard, seed, payload, mechanism in zip(shards, SEEDS, payloads, mechanisms()):
            rt.model.set_payload(payload)
            train_steps(rt.model.model, split, shard, seed=seed, dp=mechanism, secret=replayable_secret, dtype=dtype,
                        **kw)
            out.append(rt.model.payload().arrays())
        return out

    def distance(x, y):
        return float(np.sqrt(sum(np.sum((x[k].astype(np.float64) - y[k]) ** 2) for k in y)))

    bf16, f32 = alone("bfloat16"), alone("float32")
    together = train_clients_batched(rt.model, split, shards, SEEDS, payloads, dp=mechanisms(),
                                     secret=replayable_secret, dtype="bfloat16", **kw)
    for mine, theirs, full, payload in zip(together, bf16, f32, payloads):
        batching, precision = distance(mine.payload.arrays(), theirs), distance(full, theirs)
        assert 0 < batching < 1.5 * precision, (batching, precision)
        assert batching < 0.01 * distance(theirs, payload.arrays())


def test_negative_control_another_clipping_norm_does_not_match(rt, replayable_secret):
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    seq, together = dp_both_ways(rt, replayable_secret, payloads, mechanisms(2.0), batched_dp=mechanisms(1.0))
    with pytest.raises(AssertionError):
        assert_same(seq, together, **EXACT)


def test_negative_control_noise_in_another_tensor_order_does_not_match(rt, replayable_secret, monkeypatch):
    """The same noise draws, assigned in the adapter's order (every A, then every B, then the head) instead of
    the model's parameter order, in which opacus draws them."""
    def adapter_order(self):
        keys = original(self)
        return sorted(keys, key=lambda key: "ABhead".index(key[0]))

    original = StackedLoRA.trained_keys
    monkeypatch.setattr(stacked_lora.StackedLoRA, "trained_keys", adapter_order)
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    seq, together = dp_both_ways(rt, replayable_secret, payloads, mechanisms())
    with pytest.raises(AssertionError):
        assert_same(seq, together, **EXACT)


def test_the_noise_is_secret_without_a_replayable_source(rt):
    """With the real source, two batched runs of the same clients and seeds differ (and a user's secret repeats)."""
    split, _ = rt.splits
    shards = [rt.shards[i][:n] for i, n in enumerate(SIZES)]
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    kw = dict(task=rt.model.task, dp=mechanisms(), **TRAIN)

    def run(secret=None):
        return [r.payload.arrays() for r in train_clients_batched(rt.model, split, shards, SEEDS, payloads,
                                                                  secret=secret, **kw)]

    def same(a, b):
        return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)

    assert not same(run(), run())
    mine = SecretSource(entropy=12345, origin="test")
    assert same(run(mine), run(mine))


@pytest.fixture(scope="module")
def lm_rt(one_torch_thread):
    return runtime(load_config(None, ['model.name="smollm2"', "model.dropout=0.0", "model.max_length=8",
                                      "data.max_test_examples=8"]))


def test_smollm2_causal_lm_per_example_gradients_and_dp_sgd_match(lm_rt, replayable_secret):
    """A causal LM: each example's loss is the mean of its own next-token losses (opacus's per-sample loss)."""
    rt = lm_rt
    assert rt.model.task == "causal_lm"
    split, _ = rt.splits
    payloads = [random_payload(rt.model.initial, s) for s in (15, 16)]
    try:
        with float64(rt.model):
            check_per_example(rt.model, split, payloads,
                              [np.asarray(rt.shards[0][:2]), np.asarray(rt.shards[1][:1])], rt.model.task)
        seq, together = dp_both_ways(rt, replayable_secret, payloads, mechanisms(sizes=(6, 4)), sizes=(6, 4),
                                     seeds=[1, 2], dtype=torch.float32, steps=2, batch_size=BATCH, lr=3e-3,
                                     weight_decay=0.0)
    finally:
        rt.model.set_payload(rt.model.initial)
    assert_same(seq, together)
