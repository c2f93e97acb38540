"""Devices and precision: ``federation.device``, ``federation.client_gpus``, ``model.dtype``.

CI has no GPU, so the CUDA branches of :mod:`fedpeft.devices` are checked
with torch's CUDA queries faked (nothing here allocates on a GPU), the real
code paths run on the CPU with bfloat16 autocast, and one test, skipped
without CUDA, runs a federation on the GPU (``tools/gpu_check.py`` measures
more).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fedpeft
from fedpeft import devices
from fedpeft.config import Config, FederationConfig
from fedpeft.engine import simulation_backend_config
from fedpeft.errors import ConfigError
from fedpeft.privacy import dp_sgd
from fedpeft.privacy.dp_sgd import DPSGD, dp_optimizer, grad_sample_module, per_sample_loss, private_steps
from fedpeft.runtime import runtime
from fedpeft.training import loop, train_steps
from fedpeft.training.batches import EncodedSplit
from fedpeft.validation import load_config

CUDA = torch.cuda.is_available()


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend this process sees ``n`` CUDA devices (only the queries :mod:`fedpeft.devices` makes)."""

    def fake(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


# --- resolve --------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count, want", [
    ("cpu", 0, "cpu"), ("auto", 0, "cpu"), ("AUTO", 0, "cpu"),
    ("cpu", 2, "cpu"), ("auto", 2, "cuda:0"), ("cuda", 2, "cuda:0"), ("cuda:0", 2, "cuda:0"), ("cuda:1", 2, "cuda:1"),
])
def test_resolve_maps_each_valid_name_to_its_device(fake_cuda, name, count, want):
    fake_cuda(count)
    assert devices.resolve(name) == torch.device(want)


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "tpu", "", "mps", "cuda0"])
def test_resolve_rejects_unknown_names_naming_the_key_and_the_valid_ones(name):
    with pytest.raises(ConfigError) as err:
        devices.resolve(name)
    msg = str(err.value)
    assert msg.startswith(f"federation.device = {name!r} is not valid")
    assert '"auto", "cpu", "cuda" or "cuda:N"' in msg


def test_cuda_without_cuda_is_a_clear_error(fake_cuda):
    fake_cuda(0)
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ConfigError, match=r"federation.device = .*no CUDA device here.*use \"cpu\" or \"auto\""):
            devices.resolve(name)


def test_cuda_index_beyond_the_devices_is_out_of_range(fake_cuda):
    fake_cuda(2)
    with pytest.raises(ConfigError) as err:
        devices.resolve("cuda:2")
    assert str(err.value) == ("federation.device = 'cuda:2' is out of range: this machine has 2 CUDA device(s) "
                              "(cuda:0, cuda:1); choose one of: auto, cpu, cuda, cuda:0, cuda:1")


@pytest.mark.skipif(CUDA and torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_cli_rejects_a_missing_gpu_with_one_line(tmp_path, fedpeft_cli_in_process, assert_user_error):
    out = tmp_path / "out"
    proc = fedpeft_cli_in_process("run", "--set", "federation.device=cuda:7", "--set", "federation.num_rounds=1",
                                  "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, "federation.device = 'cuda:7'", "cpu")
    assert not out.exists()


# --- client_gpus and the simulation engine's resources ------------------------------------------


def test_client_gpus_need_a_cuda_device_and_the_simulation_engine(fake_cuda):
    fake_cuda(0)
    with pytest.raises(ConfigError, match=r"federation.client_gpus = 0.5 .* is the CPU here"):
        load_config(None, ["federation.client_gpus=0.5"])
    with pytest.raises(ConfigError, match=r"federation.client_gpus must be >= 0|federation.client_gpus = -1.0"):
        load_config(None, ["federation.client_gpus=-1.0"])
    fake_cuda(1)
    with pytest.raises(ConfigError, match=r"federation.client_gpus = 0.5 applies to engine = 'simulation'"):
        load_config(None, ["federation.client_gpus=0.5", 'federation.engine="inprocess"'])
    with pytest.raises(ConfigError, match=r"federation.device = 'cuda' with engine = 'simulation' needs "
                                          r"federation.client_gpus > 0"):
        load_config(None, ['federation.device="cuda"', "federation.engine=simulation"])
    cfg = load_config(None, ['federation.device="cuda"', "federation.client_gpus=0.25", "federation.engine=simulation"])
    assert (cfg.federation.device, cfg.federation.client_gpus) == ("cuda", 0.25)


@pytest.mark.parametrize("device, count, client_gpus, want", [
    ("cpu", 0, 0.0, 0.0), ("auto", 0, 0.0, 0.0), ("cuda", 1, 0.25, 0.25), ("auto", 1, 0.5, 0.5), ("cpu", 1, 0.5, 0.0),
])
def test_client_gpus_reach_rays_client_resources(fake_cuda, device, count, client_gpus, want):
    fake_cuda(count)
    cfg = Config(federation=FederationConfig(device=device, client_gpus=client_gpus, client_cpus=2.0))
    resources = simulation_backend_config(cfg)["client_resources"]
    assert resources == {"num_cpus": 2.0, "num_gpus": want}


def test_a_simulated_client_uses_a_gpu_only_with_a_share_of_one(fake_cuda):
    fake_cuda(2)  # a Ray worker sees only the GPU it shares, as cuda:0
    assert devices.client_device("cuda:1", "simulation", 0.5) == torch.device("cuda:0")
    assert devices.client_device("auto", "simulation", 0.0) == torch.device("cpu")
    assert devices.client_device("cuda:1", "inprocess", 0.0) == torch.device("cuda:1")
    fake_cuda(0)
    assert devices.client_device("auto", "simulation", 0.5) == torch.device("cpu")


def test_a_client_worker_reads_the_servers_gpu_from_the_run_config_without_seeing_it(fake_cuda):
    """``flwr run .``: each ClientApp validates the run config in a Ray worker that sees one GPU or none."""
    from fedpeft.validation import config_from_run_config

    run_config = {"federation.device": "cuda:1", "federation.client_gpus": 0.5}
    fake_cuda(2)
    assert config_from_run_config(run_config).federation.device == "cuda:1"  # the server sees both GPUs
    fake_cuda(0)  # the worker's view: CUDA_VISIBLE_DEVICES hides the server's GPUs
    with pytest.raises(ConfigError, match="no CUDA device here"):
        config_from_run_config(run_config)
    cfg = config_from_run_config(run_config, role="client")
    assert devices.client_device(cfg.federation.device, cfg.federation.engine, cfg.federation.client_gpus).type == "cpu"
    bad = {**run_config, "federation.device": "gpu"}
    with pytest.raises(ConfigError, match="federation.device = 'gpu' is not valid"):
        config_from_run_config(bad, role="client")


# --- autocast and batches ---------------------------------------------------------------------


def test_autocast_computes_matmuls_in_bfloat16_only_when_asked():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with devices.autocast("cpu", "float32"):
        assert (a @ b).dtype == torch.float32
    with devices.autocast(torch.device("cpu"), "bfloat16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"model.dtype = 'float16' is not valid; choose one of: float32, bfloat16"):
        devices.autocast("cpu", "float16")


def test_bad_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model.dtype = 'fp8' is not valid; choose one of: float32, bfloat16"):
        load_config(None, ['model.dtype="fp8"'])


def test_batches_land_on_the_device_asked_for():
    split = EncodedSplit(ids=(np.array([5, 6, 7]), np.array([8])), labels=np.array([1, 0]), pad_id=0)
    on_cpu = split.batch([0, 1], "classification")
    on_meta = split.batch([0, 1], "classification", torch.device("meta"))
    assert set(on_meta) == set(on_cpu) == {"input_ids", "attention_mask", "labels"}
    for key, value in on_meta.items():
        assert value.device.type == "meta" and value.shape == on_cpu[key].shape and value.dtype == on_cpu[key].dtype
    assert on_cpu["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]


def test_dp_noise_generators_live_on_the_device_asked_for_and_repeat_only_from_a_user_secret():
    from fedpeft.privacy.secret import OS_SECRET, SecretSource

    user = SecretSource(entropy=12345, origin="test")
    targets = ["cpu", torch.device("cpu")] + (["cuda"] if CUDA else [])
    for device in targets:
        gen = user.torch_generator("dp-sgd-noise", 3, device=device)
        assert gen.device.type == torch.device(device).type
        draw = torch.randn(5, generator=gen, device=gen.device)
        again = torch.randn(5, generator=user.torch_generator("dp-sgd-noise", 3, device=device), device=gen.device)
        other = torch.randn(5, generator=OS_SECRET.torch_generator("dp-sgd-noise", 3, device=device), device=gen.device)
        assert torch.equal(draw, again) and not torch.equal(draw, other)


# --- training, evaluation and DP on the real model ------------------------------------------------


@pytest.fixture(scope="module")
def rt():
    return runtime(load_config(None, ['model.name="tiny-bert"', "model.max_length=16", "model.dropout=0.0",
                                      "peft.r=4", "data.max_test_examples=32", 'federation.device="cpu"']))


pytestmark = pytest.mark.usefixtures("restore_resident")  # tests/conftest.py


def _inputs_on(model, seen: list[torch.device]):
    """A forward pre-hook recording the device of every tensor the model is called with."""

    def hook(module, args, kwargs):
        seen.extend(t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    return model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("dp", [None, DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)], ids=["plain", "dp"])
def test_training_and_evaluation_put_every_batch_on_the_models_device(rt, monkeypatch, dp):
    model = rt.model.model
    split, test = rt.splits
    asked: list = []
    real_batch = EncodedSplit.batch

    def spy(self, indices, task, device=None):
        asked.append(device)
        return real_batch(self, indices, task, device)

    monkeypatch.setattr(EncodedSplit, "batch", spy)
    seen: list[torch.device] = []
    handle = _inputs_on(model, seen)
    try:
        train_steps(model, split, rt.shards[0][:8], task=rt.model.task, steps=2, batch_size=4, lr=1e-3, weight_decay=0.0,
                    seed=0, dp=dp, dtype="bfloat16")
        loop.evaluate(model, test, task=rt.model.task, batch_size=16, limit=32, dtype="bfloat16")
    finally:
        handle.remove()
    assert asked and all(d == rt.model.device for d in asked), asked
    assert seen and all(d == rt.model.device for d in seen)
    assert all(p.device == rt.model.device for p in model.parameters())


def test_bfloat16_loss_is_close_to_float32_on_the_same_batch(rt):
    model = rt.model.model
    split, _ = rt.splits
    batch = split.batch(rt.shards[0][:16], rt.model.task, rt.model.device)
    with torch.no_grad():
        full, logits32 = loop._forward_loss(model, batch, rt.model.task)
        with devices.autocast(rt.model.device, "bfloat16"):
            half, logits16 = loop._forward_loss(model, batch, rt.model.task)
    assert logits16.dtype == torch.bfloat16 and logits32.dtype == torch.float32
    assert half.dtype == torch.float32  # autocast keeps the loss in float32
    assert float(half) != float(full), "autocast changed nothing: bfloat16 did not run"
    assert math.isclose(float(half), float(full), rel_tol=2e-2)
    metrics32 = loop.evaluate(model, rt.splits[1], task=rt.model.task, batch_size=16, limit=32)
    metrics16 = loop.evaluate(model, rt.splits[1], task=rt.model.task, batch_size=16, limit=32, dtype="bfloat16")
    assert math.isclose(metrics16["loss"], metrics32["loss"], rel_tol=2e-2)


def test_dp_step_under_bfloat16_clips_float32_grads_matching_the_per_sample_reference(rt, monkeypatch):
    """opacus's grad samples come out in bfloat16 under autocast; they are cast to float32 before
    clipping, and the clipped mean equals clipping each example's own gradient (computed alone)."""
    from tests.test_models import random_payload

    rt.model.set_payload(random_payload(rt.model.initial, seed=1))  # B != 0: A gets gradients too
    model = rt.model.model
    model.train()
    split, _ = rt.splits
    idx = rt.shards[0][:4]
    task, device = rt.model.task, rt.model.device
    params = [p for p in model.parameters() if p.requires_grad]
    # The reference: each example alone, the same autocast forward, clipped in float64.
    clipped = []
    for i in idx:
        batch = split.batch([i], task, device)
        with devices.autocast(device, "bfloat16"):
            loss = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   batch, task).sum()
        grads = [g.double() for g in torch.autograd.grad(loss, params)]
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads)))
        clipped.append([g * min(1.0, 0.05 / norm) for g in grads])
        assert norm > 0.05, "the clipping norm must bind, or clipping goes unchecked"
    want = [sum(c[k] for c in clipped) / len(idx) for k in range(len(params))]

    produced, dtypes = [], []
    real_cast = dp_sgd.grad_samples_to_param_dtype

    def cast(optimizer):  # what opacus's grad samplers produced
        produced.extend(p.grad_sample.dtype for p in params)
        real_cast(optimizer)

    monkeypatch.setattr(dp_sgd, "grad_samples_to_param_dtype", cast)
    with grad_sample_module(model) as forward:
        opt = dp_optimizer(torch.optim.SGD(params, lr=0.0), DPSGD(0.0, 0.05, 1.0), len(idx),
                           torch.Generator(device).manual_seed(0))
        real_step = opt.step

        def step(*args, **kwargs):  # what clipping receives
            dtypes.extend(p.grad_sample.dtype for p in params)
            return real_step(*args, **kwargs)

        opt.step = step

        def loss_of(rows):
            batch = split.batch(rows, task, device)
            with devices.autocast(device, "bfloat16"):
                return per_sample_loss(forward(batch["input_ids"], batch["attention_mask"]), batch, task).mean()

        losses = list(private_steps(opt, [idx], loss_of))
        assert len(losses) == 1 and losses[0] is not None
        assert torch.bfloat16 in produced, "opacus made float32 grad samples: the cast is untested"
        assert dtypes and all(d == torch.float32 for d in dtypes), dtypes
        for p, w in zip(params, want):
            assert p.grad.dtype == torch.float32
            scale = float(w.abs().max())
            assert scale > 0
            torch.testing.assert_close(p.grad.double(), w, rtol=0, atol=3e-2 * scale)
    model.zero_grad(set_to_none=True)


def test_inprocess_federation_in_bfloat16_on_the_cpu_records_its_device(tmp_path, tiny_federation):
    summary = fedpeft.run(overrides=[*tiny_federation, "federation.num_rounds=2", "train.local_steps=2",
                                     'federation.device="cpu"', 'model.dtype="bfloat16"'], out=tmp_path / "run")
    assert summary["device"] == "cpu" and summary["dtype"] == "bfloat16"
    assert summary["config"]["federation"]["device"] == "cpu"
    assert math.isfinite(summary["final_loss"]) and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["bytes_up"] > 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_inprocess_federation_on_cuda_with_sample_dp_and_bfloat16(tmp_path, tiny_federation):
    summary = fedpeft.run(overrides=[*tiny_federation, "federation.num_rounds=2", 'federation.device="cuda"',
                                     'model.dtype="bfloat16"', 'dp.mode="sample"', "dp.delta=0.01"], out=tmp_path / "run")
    assert summary["device"] == "cuda:0" and "GPU" in summary["machine"]
    assert math.isfinite(summary["final_loss"]) and summary["epsilon"] > 0
