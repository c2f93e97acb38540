"""The resident model, the LoRA bridge and the wire format, on the real MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.validation import load_config
from fedpeft.errors import ConfigError
from fedpeft.models.lora import PREFIX
from fedpeft.models.resident import frozen_fingerprint
from fedpeft.runtime import runtime
from fedpeft.training import evaluate, train_steps
from fedpeft.wire import from_array_record, nbytes, to_array_record
from strategies import LoRAFactors, Payload


@pytest.fixture(scope="module")
def rt():
    return runtime(load_config(None, ["data.max_test_examples=64"]))


pytestmark = pytest.mark.usefixtures("restore_resident")  # tests/conftest.py


def random_payload(template: Payload, seed: int) -> Payload:
    """Same keys and shapes as ``template``, random non-zero values (B != 0 too)."""
    rng = np.random.default_rng(seed)
    factors = {
        m: LoRAFactors(
            A=rng.normal(0, 0.1, f.A.shape).astype(np.float32),
            B=rng.normal(0, 0.1, f.B.shape).astype(np.float32),
            scaling=f.scaling,
        )
        for m, f in template.factors.items()
    }
    extras = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in template.extras.items()}
    return Payload(factors=factors, extras=extras)


def test_only_adapter_and_head_are_trainable_and_sent(rt):
    payload = rt.model.payload()
    trainable = {n for n, p in rt.model.model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or ("modules_to_save" in n) for n in trainable)
    # The payload holds exactly the trainable tensors, no frozen weight.
    sent = sum(a.size for a in payload.arrays().values())
    assert sent == rt.model.trainable_params
    assert set(payload.factors) == {m for m in rt.model.scalings}
    assert all(m.endswith(("query", "value")) for m in payload.factors)
    assert payload.factors[next(iter(payload.factors))].scaling == pytest.approx(16 / 8)


def test_default_config_trains_the_readmes_222338_parameters(rt):
    """README, "What `make run` does": LoRA r=8 on query and value of MiniLM's 6 layers
    plus BERT's head (pooler and classifier) trained in full."""
    lora = 6 * 2 * 8 * (384 + 384)  # 12 modules, A (8 x 384) and B (384 x 8)
    head = (384 * 384 + 384) + (2 * 384 + 2)  # pooler dense, classifier
    assert lora + head == 222_338
    assert rt.model.trainable_params == 222_338
    assert sum(p.numel() for p in rt.model.model.parameters() if p.requires_grad) == 222_338
    assert "222,338 trainable parameters (0.98%)" in (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_training_changes_adapter_but_never_base_weights(rt):
    before = frozen_fingerprint(rt.model.model)
    start = rt.model.payload()
    split, _ = rt.splits
    train_steps(rt.model.model, split, rt.shards[0][:64], task=rt.model.task, steps=2, batch_size=8, lr=1e-2,
                weight_decay=0.0, seed=1)
    after = frozen_fingerprint(rt.model.model)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    moved = rt.model.payload()
    assert any(not np.array_equal(moved.factors[m].B, start.factors[m].B) for m in start.factors)
    rt.model.set_payload(start)


def test_payload_round_trips_through_model_and_array_record(rt):
    original = rt.model.payload()
    payload = random_payload(original, seed=0)
    rt.model.set_payload(payload)
    back = rt.model.payload()
    for m, f in payload.factors.items():
        assert np.array_equal(back.factors[m].A, f.A) and np.array_equal(back.factors[m].B, f.B)
    for k, v in payload.extras.items():
        assert np.array_equal(back.extras[k], v)
    arrays = payload.arrays()
    record = to_array_record(arrays)
    decoded = from_array_record(record)
    assert decoded.keys() == arrays.keys()
    assert all(np.array_equal(decoded[k], arrays[k]) and decoded[k].dtype == np.float32 for k in arrays)
    assert nbytes(decoded) == payload.nbytes
    rt.model.set_payload(original)


def test_a_swap_reaches_the_model_after_its_parameters_get_new_storage():
    """The payload swap writes into the adapter's parameters found once; ``.double()`` (or ``.to(device)``)
    gives them new storage, and the swap must still land in what the model computes with."""
    from fedpeft.models.resident import resident_model
    from fedpeft.runtime import resident_spec

    cfg = load_config(None, ['model.name="tiny-bert"'])
    model = resident_model(resident_spec(cfg, 2))
    first = random_payload(model.payload(), seed=1)
    model.set_payload(first)  # finds the adapter's parameters
    model.model.double()
    second = random_payload(first, seed=2)
    model.set_payload(second)
    back = model.payload()
    for m, f in second.factors.items():
        np.testing.assert_allclose(back.factors[m].A, f.A, rtol=1e-7)
        np.testing.assert_allclose(back.factors[m].B, f.B, rtol=1e-7)
    for k, v in second.extras.items():
        np.testing.assert_allclose(back.extras[k], v, rtol=1e-7)


def test_residual_is_added_to_base_weight_and_removed_again(rt):
    original = rt.model.payload()
    module = sorted(original.factors)[0]
    weight = rt.model.model.get_submodule(PREFIX + module).base_layer.weight
    w0 = weight.detach().clone()
    residual = np.full(tuple(weight.shape), 0.01, dtype=np.float32)
    rt.model.set_payload(Payload(factors=original.factors, residuals={module: residual}, extras=original.extras))
    assert torch.allclose(weight, w0 + 0.01)
    rt.model.set_payload(original)
    assert torch.equal(weight, w0)


@pytest.mark.parametrize("with_residuals", [False, True])
def test_peft_export_reproduces_logits(rt, tmp_path, with_residuals):
    """`PeftModel.from_pretrained` on a fresh base gives fedpeft's logits, residuals included."""
    from peft import PeftModel

    from fedpeft.models.minilm import load_minilm
    from fedpeft.server.run_folder import RunFolder

    original = rt.model.payload()
    payload = random_payload(original, seed=3)
    if with_residuals:  # a FedEx-LoRA / FLoRA-style dense change folded into the base
        rng = np.random.default_rng(4)
        residuals = {m: rng.normal(0, 0.02, f.shape).astype(np.float32) for m, f in list(payload.factors.items())[:3]}
        payload = Payload(factors=payload.factors, residuals=residuals, extras=payload.extras)
    rt.model.set_payload(payload)
    _, test = rt.splits
    batch = test.batch(np.arange(16), "classification")
    with torch.inference_mode():
        ours = rt.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = RunFolder(tmp_path).export_adapter(rt.model, payload)
    assert (target / "adapter_config.json").is_file() and (target / "adapter_model.safetensors").is_file()
    base, _ = load_minilm(num_labels=2, dropout=0.1)
    loaded = PeftModel.from_pretrained(base, target).eval()
    with torch.inference_mode():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    rt.model.set_payload(original)


def test_evaluate_is_order_independent_and_matches_a_plain_loop(rt):
    _, test = rt.splits
    metrics = evaluate(rt.model.model, test, task=rt.model.task, batch_size=7, limit=40)
    correct = 0
    with torch.inference_mode():
        for i in range(40):
            b = test.batch([i], "classification")
            correct += int(rt.model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax() == b["labels"][0])
    assert metrics["accuracy"] == pytest.approx(correct / 40)


def test_unknown_target_module_is_a_config_error():
    cfg = load_config(None, ['peft.target_modules=["nonexistent_proj"]'])
    with pytest.raises(ConfigError, match="peft.target_modules"):
        runtime(cfg)


def test_lower_rank_payload_trains_at_exactly_its_rank(rt):
    """A rank-4 client on the rank-8 resident model: the zero padding never moves."""
    from fedpeft.models.lora import trainable_state

    original = rt.model.payload()
    rng = np.random.default_rng(5)
    low = Payload(
        factors={m: LoRAFactors(A=rng.normal(0, 0.1, (4, f.A.shape[1])).astype(np.float32),
                                B=rng.normal(0, 0.1, (f.B.shape[0], 4)).astype(np.float32), scaling=4.0)
                 for m, f in original.factors.items()},
        extras=original.extras,
    )
    rt.model.set_payload(low)
    split, _ = rt.splits
    train_steps(rt.model.model, split, rt.shards[0][:64], task=rt.model.task, steps=2, batch_size=8, lr=1e-2,
                weight_decay=0.0, seed=2)
    back = rt.model.payload()
    assert all(f.rank == 4 and f.scaling == 4.0 for f in back.factors.values())
    full = trainable_state(rt.model.model)
    a_keys = [k for k in full if k.endswith("lora_A.weight")]
    assert all(np.all(full[k][4:] == 0) for k in a_keys)
    assert any(not np.array_equal(back.factors[m].A, low.factors[m].A) for m in low.factors)
    rt.model.set_payload(original)
    assert all(f.rank == 8 for f in rt.model.payload().factors.values())


def test_strategy_can_freeze_a_factor(rt):
    original = rt.model.payload()
    rt.model.set_payload(random_payload(original, seed=7), trainable=lambda m: {"A": False, "B": True})
    start = rt.model.payload()
    split, _ = rt.splits
    train_steps(rt.model.model, split, rt.shards[0][:64], task=rt.model.task, steps=2, batch_size=8, lr=1e-2,
                weight_decay=0.0, seed=3)
    after = rt.model.payload()
    assert all(np.array_equal(after.factors[m].A, start.factors[m].A) for m in start.factors)
    assert any(not np.array_equal(after.factors[m].B, start.factors[m].B) for m in start.factors)
    rt.model.set_payload(original)
    assert all(p.requires_grad for n, p in rt.model.model.named_parameters() if "lora_" in n)


def test_mean_pooling_ignores_padding_and_exports_with_plain_peft(tmp_path):
    """model.pooling = "mean": the classifier sees the masked mean of the last hidden states, so a
    review's logits do not depend on the padding of the batch it is in; the export loads on
    load_minilm(pooling="mean") with plain peft and gives the same logits."""
    from peft import PeftModel

    from fedpeft.models.minilm import MeanPooler, load_minilm
    from fedpeft.server.run_folder import RunFolder

    cfg = load_config(None, ['model.pooling="mean"', "data.max_test_examples=64"])
    assert cfg.peft.modules_to_save == ["classifier"]  # no pooler weights to train
    mean = runtime(cfg)
    assert isinstance(mean.model.model.base_model.model.bert.pooler, MeanPooler)
    payload = random_payload(mean.model.payload(), seed=5)
    mean.model.set_payload(payload)
    _, test = mean.splits
    order = np.argsort(test.lengths()[:64])
    short, longest = int(order[0]), int(order[-1])
    assert test.lengths()[short] < test.lengths()[longest]
    with torch.inference_mode():
        alone = test.batch([short], "classification")
        padded = test.batch([short, longest], "classification")
        a = mean.model.model(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0]
        b = mean.model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    target = RunFolder(tmp_path).export_adapter(mean.model, payload)
    base, _ = load_minilm(num_labels=2, dropout=0.1, pooling="mean")
    loaded = PeftModel.from_pretrained(base, target).eval()
    with torch.inference_mode():
        theirs = loaded(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        ours = mean.model.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="model.pooling = 'mean' is not available for model 'smollm2'"):
        load_config(None, ['model.name="smollm2"', 'model.pooling="mean"'])
