"""Batched multi-client training equals training the clients one after another.

Every test trains K clients twice from the same received payloads: one after
another with :func:`train_steps` (what a sequential client does) and together
with :func:`train_clients_batched`, then compares each client's loss at every
step and its final upload. Both compute the same function (with dropout on,
each client draws its own masks from its own seed) and differ only in the
summation order of their matmuls.

Most tests run the model in float64, where that order costs nothing
visible: losses agree to rtol 1e-9 and uploads (float32 arrays) to one
float32 rounding. In float32, the dtype fedpeft trains in, losses agree to
rtol 1e-4 / atol 1e-5, and so do SGD's uploads; AdamW divides each
coordinate's step by that coordinate's own gradient size, so the few
coordinates whose gradient is at float32 rounding level move by up to lr
either way, and its uploads are compared by update norm. The negative
controls show the comparison catches a wrong loss.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch

import fedpeft.training.batched as batched
import fedpeft.training.client_dropout as client_dropout
from fedpeft.models.lora import PREFIX
from fedpeft.runtime import runtime
from fedpeft.training.batched import stacked_batch, train_clients_batched
from fedpeft.training.loop import local_schedule, train_steps
from fedpeft.validation import load_config
from strategies import LoRAFactors, Payload

SMALL = ["model.dropout=0.0", "peft.dropout=0.0", "model.max_length=16", "data.max_test_examples=16"]


@pytest.fixture(scope="module")
def rt(one_torch_thread):
    return runtime(load_config(None, SMALL))


pytestmark = pytest.mark.usefixtures("restore_resident")  # tests/conftest.py


def random_payload(template: Payload, seed: int, rank: int | None = None, residual_seed: int | None = None) -> Payload:
    """``template``'s modules with random non-zero factors (B != 0) and head, optionally at a lower ``rank``
    (scaling alpha / rank as peft gives it) and with random residuals."""
    rng = np.random.default_rng(seed)
    factors = {}
    for m, f in template.factors.items():
        r = rank or f.rank
        factors[m] = LoRAFactors(A=rng.normal(0, 0.1, (r, f.A.shape[1])).astype(np.float32),
                                 B=rng.normal(0, 0.1, (f.B.shape[0], r)).astype(np.float32),
                                 scaling=f.scaling * f.rank / r)
    extras = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in template.extras.items()}
    residuals = {}
    if residual_seed is not None:
        res_rng = np.random.default_rng(residual_seed)
        residuals = {m: res_rng.normal(0, 0.01, (f.B.shape[0], f.A.shape[1])).astype(np.float32)
                     for m, f in list(template.factors.items())[::3]}
    return Payload(factors=factors, residuals=residuals, extras=extras)


def sequential(resident, split, shards, seeds, payloads, trainable=None, **kw):
    """Each client alone, as ClientHandlers.train runs it: (metrics, upload, step losses) per client."""
    out = []
    for shard, seed, payload in zip(shards, seeds, payloads):
        resident.set_payload(payload, trainable=trainable)
        losses: list[float] = []
        metrics = train_steps(resident.model, split, shard, seed=seed, step_losses=losses, **kw)
        out.append((metrics, resident.payload(), losses))
    return out


@contextmanager
def float64(resident):
    """The resident model in float64 for the block (float32 again afterwards, exactly: its values are float32)."""
    resident.model.double()
    try:
        yield
    finally:
        resident.model.float()


EXACT = dict(loss_rtol=1e-9, rtol=1e-6, atol=1e-8)
"""Tolerances in float64: uploads are float32 arrays, so one float32 rounding apart at most."""


def assert_same(seq, together, *, loss_rtol=1e-4, rtol=1e-4, atol=1e-5, update_rtol=None, initial=None) -> None:
    """Each client's step losses, metrics and upload agree; ``update_rtol``: compare each upload array's change
    from ``initial`` (the payloads received) by norm instead of elementwise."""
    assert len(seq) == len(together)
    for client, ((metrics, upload, losses), result) in enumerate(zip(seq, together)):
        assert len(result.losses) == len(losses), client
        np.testing.assert_allclose(result.losses, losses, rtol=loss_rtol, atol=loss_rtol / 10,
                                   err_msg=f"client {client} losses")
        assert result.metrics["steps"] == metrics["steps"]
        assert result.metrics["mean_batch_size"] == metrics["mean_batch_size"]
        np.testing.assert_allclose(result.metrics["train_loss"], metrics["train_loss"], rtol=loss_rtol)
        mine, theirs = result.payload.arrays(), upload.arrays()
        assert set(mine) == set(theirs)
        assert result.payload.scalings() == upload.scalings()
        for key in theirs:
            assert mine[key].shape == theirs[key].shape, key
            if update_rtol is None:
                np.testing.assert_allclose(mine[key], theirs[key], rtol=rtol, atol=atol, err_msg=f"client {client} {key}")
            else:
                start = initial[client].arrays()[key]
                change = np.linalg.norm(theirs[key] - start)
                assert change > 0, key
                assert np.linalg.norm(mine[key] - theirs[key]) <= update_rtol * change, f"client {client} {key}"


def shards_of(rt, sizes):
    return [rt.shards[i][:n] for i, n in enumerate(sizes)]


TRAIN = dict(steps=3, batch_size=4, lr=3e-3, weight_decay=0.01)


def both_ways(rt, sizes, seeds, payloads, dtype=torch.float64, **train):
    """(sequential, batched) results of clients with shards of ``sizes`` in ``dtype``."""
    split, _ = rt.splits
    shards = shards_of(rt, sizes)
    kw = dict(task=rt.model.task, **train)
    with float64(rt.model) if dtype == torch.float64 else nullcontext():
        return (sequential(rt.model, split, shards, seeds, payloads, **kw),
                train_clients_batched(rt.model, split, shards, seeds, payloads, **kw))


def test_adamw_clients_of_different_shards_and_seeds_match_sequential(rt):
    # The last client's batches have 3 rows: its block carries a filler row.
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    seq, together = both_ways(rt, (10, 7, 3), [11, 22, 33], payloads, **TRAIN)
    assert_same(seq, together, **EXACT)
    assert len({r.losses[0] for r in together}) == 3  # the clients really differ


def test_float32_adamw_matches_sequential_to_float32_rounding(rt):
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    seq, together = both_ways(rt, (10, 7, 3), [11, 22, 33], payloads, dtype=torch.float32, **TRAIN)
    assert_same(seq, together, update_rtol=3e-3, initial=payloads)


def test_bfloat16_autocast_batching_costs_less_than_bfloat16_itself(rt):
    """Under ``model.dtype = "bfloat16"`` the matmuls round differently batched and alone; that must stay below
    what bfloat16 changes against float32, per client, in each loss and in the whole update."""
    payloads = [random_payload(rt.model.initial, s) for s in (1, 3)]
    split, _ = rt.splits
    shards, seeds = shards_of(rt, (10, 3)), [11, 33]
    kw = dict(task=rt.model.task, **TRAIN)
    bf16 = sequential(rt.model, split, shards, seeds, payloads, dtype="bfloat16", **kw)
    f32 = sequential(rt.model, split, shards, seeds, payloads, dtype="float32", **kw)
    together = train_clients_batched(rt.model, split, shards, seeds, payloads, dtype="bfloat16", **kw)

    def distance(x, y):
        return np.sqrt(sum(np.sum((x[k] - y[k]) ** 2) for k in y))

    for (_, alone, losses), (_, full, full_losses), result in zip(bf16, f32, together):
        np.testing.assert_allclose(result.losses, losses, rtol=2e-2, atol=1e-3)
        batching = distance(result.payload.arrays(), alone.arrays())
        precision = distance(full.arrays(), alone.arrays())
        assert 0 < batching < precision, (batching, precision)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_sgd_with_momentum_matches_sequential(rt, dtype):
    payloads = [random_payload(rt.model.initial, s) for s in (4, 5, 6)]
    seq, together = both_ways(rt, (9, 5, 12), [5, 6, 7], payloads, dtype=dtype, steps=2, batch_size=4, lr=0.05,
                              weight_decay=0.01, optimizer="sgd", momentum=0.9)
    assert_same(seq, together, **(EXACT if dtype == torch.float64 else {}))


def test_heterogeneous_ranks_are_padded_and_uploaded_at_each_clients_rank(rt):
    payloads = [random_payload(rt.model.initial, 7, rank=4), random_payload(rt.model.initial, 8, rank=8)]
    seq, together = both_ways(rt, (8, 6), [1, 2], payloads, **{**TRAIN, "steps": 2})
    assert_same(seq, together, **EXACT)
    module = next(iter(payloads[0].factors))
    assert together[0].payload.factors[module].A.shape == (4, 384)
    assert together[0].payload.factors[module].scaling == pytest.approx(4.0)
    assert together[1].payload.factors[module].B.shape == (384, 8)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-residual", "per-client-residuals"])
def test_residuals_fold_once_or_apply_per_client(rt, shared):
    payloads = [random_payload(rt.model.initial, 9, residual_seed=100),
                random_payload(rt.model.initial, 10, residual_seed=100 if shared else 101)]
    assert payloads[0].residuals
    seq, together = both_ways(rt, (6, 6), [3, 4], payloads, steps=2, batch_size=4, lr=3e-3, weight_decay=0.0)
    # Sequential folds W0 + R in float32 (the model's originals), batched applies R apart in float64.
    assert_same(seq, together, **(EXACT if shared else dict(loss_rtol=1e-6, rtol=1e-5, atol=1e-7)))


def test_frozen_factors_stay_frozen_as_a_rules_trainable_says(rt):
    """FFA-LoRA's ``trainable``: every A frozen, B and the head trained."""
    payloads = [random_payload(rt.model.initial, s) for s in (17, 18)]
    seq, together = both_ways(rt, (8, 5), [1, 2], payloads, trainable=lambda m: {"A": False, "B": True}, **TRAIN)
    assert_same(seq, together, **EXACT)
    for payload, result in zip(payloads, together):
        for m, f in payload.factors.items():
            np.testing.assert_array_equal(result.payload.factors[m].A, f.A)
            assert not np.array_equal(result.payload.factors[m].B, f.B)


def test_a_head_that_is_not_a_linear_layer_trains_per_client(one_torch_thread):
    """``modules_to_save = ["bert.pooler", ...]`` wraps BertPooler (dense + tanh): the generic per-client head path."""
    rt = runtime(load_config(None, [*SMALL, 'peft.modules_to_save=["bert.pooler", "classifier"]']))
    payloads = [random_payload(rt.model.initial, s) for s in (19, 20)]
    assert "bert.pooler.dense.weight" in payloads[0].extras
    head = rt.model.model.get_submodule("base_model.model.bert.pooler").modules_to_save["default"]
    assert not isinstance(head, torch.nn.Linear)
    try:
        seq, together = both_ways(rt, (6, 3), [1, 2], payloads, steps=2, batch_size=4, lr=3e-3, weight_decay=0.0)
    finally:
        rt.model.set_payload(rt.model.initial)
    assert_same(seq, together, **EXACT)


def test_poisson_batches_with_empty_draws_skip_only_that_clients_step(rt):
    shards, seeds = shards_of(rt, (12, 20)), [0, 1]
    schedules = [local_schedule(s, steps=6, batch_size=1, seed=seed, sampling="poisson") for s, seed in zip(shards, seeds)]
    sizes = [[len(b) for b in s] for s in schedules]
    # Only meaningful if a client skips a step another one takes, and batch sizes vary.
    assert any(0 in s for s in sizes) and any(max(s) > 1 for s in sizes), sizes
    payloads = [random_payload(rt.model.initial, s) for s in (11, 12)]
    seq, together = both_ways(rt, (12, 20), seeds, payloads, steps=6, batch_size=1, lr=3e-3, weight_decay=0.0,
                              sampling="poisson")
    assert [len(r.losses) for r in together] == [sum(n > 0 for n in s) for s in sizes]
    assert_same(seq, together, **EXACT)


def _filler_rows_counted(logits, batch, task, k):
    return _right_loss(logits, {**batch, "weight": torch.ones_like(batch["weight"])}, task, k)


def _mean_over_all_rows(logits, batch, task, k):
    per_client = _right_loss(logits, batch, task, k)
    rows = batch["weight"].view(k, -1).sum(1)
    return per_client * rows / rows.sum()


_right_loss = batched.client_losses


@pytest.mark.parametrize("wrong, optimizer", [(_filler_rows_counted, "adamw"), (_mean_over_all_rows, "sgd")],
                         ids=["filler-rows-counted", "mean-over-all-rows"])
def test_negative_control_a_wrong_loss_does_not_match(rt, monkeypatch, wrong, optimizer):
    payloads = [random_payload(rt.model.initial, s) for s in (13, 14)]
    monkeypatch.setattr(batched, "client_losses", wrong)
    seq, together = both_ways(rt, (10, 3), [1, 2], payloads, steps=2, batch_size=4, weight_decay=0.0,
                              lr=0.05 if optimizer == "sgd" else 3e-3, optimizer=optimizer)
    with pytest.raises(AssertionError):
        assert_same(seq, together, **EXACT)


def test_filler_rows_attend_one_pad_token_and_weigh_nothing(rt):
    split, _ = rt.splits
    idx = [np.array([0, 1, 2]), np.array([], dtype=np.int64), np.array([5])]
    batch = stacked_batch(split, idx, "classification")
    width = max(len(split.ids[i]) for i in (0, 1, 2, 5))
    assert batch["input_ids"].shape == (9, width)
    assert batch["weight"].tolist() == [1, 1, 1, 0, 0, 0, 1, 0, 0]
    filler = batch["weight"] == 0
    assert (batch["attention_mask"][filler].sum(1) == 1).all()
    assert (batch["attention_mask"][~filler].sum(1) == torch.tensor([len(split.ids[i]) for i in (0, 1, 2, 5)])).all()


@contextmanager
def dropout_on(resident, p: float = 0.1):
    """Every dropout of the resident model at rate ``p`` for the block: the base model's modules (BERT's
    attention reads its rate from one), Llama attention's ``attention_dropout`` and each LoRA layer's
    dropout (peft builds an Identity at rate 0, so a Dropout takes its place)."""
    net = resident.model
    modules = [(m, m.p) for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    attention = [(m, m.attention_dropout) for m in net.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    lora = [(layer, layer.lora_dropout["default"]) for layer in (net.get_submodule(PREFIX + m) for m in resident.scalings)]
    for m, _ in modules:
        m.p = p
    for m, _ in attention:
        m.attention_dropout = p
    for layer, _ in lora:
        layer.lora_dropout["default"] = torch.nn.Dropout(p)
    try:
        yield
    finally:
        for m, rate in modules:
            m.p = rate
        for m, rate in attention:
            m.attention_dropout = rate
        for layer, original in lora:
            layer.lora_dropout["default"] = original


def test_dropout_on_each_client_draws_the_masks_it_draws_alone(rt):
    """Hidden, attention, classifier and LoRA dropout at 0.1: batched equals sequential exactly in float64,
    so each client's masks come from its own seeded stream, whatever the other clients draw."""
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2, 3)]
    with dropout_on(rt.model):
        seq, together = both_ways(rt, (10, 7, 3), [11, 22, 33], payloads, **TRAIN)
    assert_same(seq, together, **EXACT)
    without, _ = both_ways(rt, (10, 7, 3), [11, 22, 33], payloads, **{**TRAIN, "steps": 1})
    assert all(abs(a[2][0] - b[2][0]) > 1e-6 for a, b in zip(seq, without))  # dropout really was on


def test_negative_control_one_shared_dropout_stream_does_not_match(rt, monkeypatch):
    monkeypatch.setattr(client_dropout.ClientRandomStreams, "client", lambda self, k: nullcontext())
    payloads = [random_payload(rt.model.initial, s) for s in (1, 2)]
    with dropout_on(rt.model):
        seq, together = both_ways(rt, (6, 6), [11, 22], payloads, **{**TRAIN, "steps": 2})
    with pytest.raises(AssertionError):
        assert_same(seq, together, **EXACT)


@pytest.fixture(scope="module")
def lm_rt(one_torch_thread):
    return runtime(load_config(None, ['model.name="smollm2"', "model.dropout=0.0", "model.max_length=8",
                                      "data.max_test_examples=8"]))


def test_smollm2_causal_lm_clients_match_sequential(lm_rt):
    rt = lm_rt
    assert rt.model.task == "causal_lm"
    payloads = [random_payload(rt.model.initial, s) for s in (15, 16)]
    try:
        seq, together = both_ways(rt, (5, 3), [1, 2], payloads, dtype=torch.float32, steps=2, batch_size=2, lr=3e-3,
                                  weight_decay=0.0)
    finally:
        rt.model.set_payload(rt.model.initial)
    assert_same(seq, together, update_rtol=3e-3, initial=payloads)


def test_smollm2_attention_and_lora_dropout_match_sequential(lm_rt):
    rt = lm_rt
    payloads = [random_payload(rt.model.initial, s) for s in (15, 16)]
    try:
        with dropout_on(rt.model, 0.2):
            seq, together = both_ways(rt, (5, 3), [1, 2], payloads, dtype=torch.float32, steps=2, batch_size=2,
                                      lr=3e-3, weight_decay=0.0)
    finally:
        rt.model.set_payload(rt.model.initial)
    assert_same(seq, together, update_rtol=3e-3, initial=payloads)
