"""The pinned upstream internals fedpeft relies on (fedpeft/compat/): each test fails if an upgrade changes them."""

from __future__ import annotations

import inspect
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from flwr.supercore.task_identity import TaskIdentity

from fedpeft.compat.flwr_internals import (
    DP_WRAPPER_HOOKS,
    DPWrapperHooks,
    check_dp_wrapper_hooks,
    dp_wrapper_class,
    set_server_task_identity,
)
from fedpeft.compat.opacus_internals import gaussian_noise, prv_grid_points

FLOWER_WRAPPERS = [DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping,
                   DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyClientSideAdaptiveClipping]


@pytest.fixture
def fresh_task_identity(monkeypatch):
    """TaskIdentity unset, and put back as it was afterwards."""
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, None)


# --- opacus --------------------------------------------------------------------


@pytest.mark.parametrize("history", [[(1.0, 0.01, 100)], [(0.8, 0.05, 30), (1.5, 0.2, 7)]])
def test_prv_grid_points_is_the_grid_opacus_get_epsilon_builds(monkeypatch, history):
    from opacus.accountants import PRVAccountant

    built = []
    upstream = PRVAccountant._get_domain

    def recording(self, *args, **kwargs):
        domain = upstream(self, *args, **kwargs)
        built.append(domain.size)
        return domain

    monkeypatch.setattr(PRVAccountant, "_get_domain", recording)
    acc = PRVAccountant()
    acc.history = list(history)
    delta = 1e-5
    acc.get_epsilon(delta=delta, eps_error=0.01, delta_error=delta / 1000)
    assert built, "opacus's get_epsilon no longer sizes its grid with _get_domain"
    assert prv_grid_points(history, 0.01, delta / 1000) == built[-1]


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_prv_grid_explodes_with_little_noise():
    # Why fedpeft asks before composing: this history would need gigabytes.
    assert prv_grid_points([(0.3, 0.5, 1000)], 0.01, 1e-8) > 100 * prv_grid_points([(1.0, 0.01, 1000)], 0.01, 1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_noise_is_the_noise_dp_optimizer_adds(dtype):
    """The batched engine draws each client's noise with gaussian_noise: it must be DPOptimizer's draw, bit for bit,
    and a zero std must draw nothing (the generator's state is left where it was)."""
    from opacus.optimizers import DPOptimizer

    params = [torch.nn.Parameter(torch.zeros(3, 5, dtype=dtype)), torch.nn.Parameter(torch.zeros(7, dtype=dtype))]
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.5, max_grad_norm=0.4,
                      expected_batch_size=1, generator=torch.Generator().manual_seed(9))
    for p in params:
        p.summed_grad = torch.zeros_like(p)
        p.grad_sample = torch.zeros((0, *p.shape), dtype=dtype)
    opt.add_noise()
    generator = torch.Generator().manual_seed(9)
    for p in params:
        noise = gaussian_noise(1.5 * 0.4, torch.zeros_like(p), generator)
        assert noise.dtype == dtype
        torch.testing.assert_close(noise, p.grad, rtol=0, atol=0)
    state = generator.get_state()
    assert not gaussian_noise(0.0, torch.zeros(4), generator).any()
    assert torch.equal(generator.get_state(), state)


# --- Flower's DP wrappers ---------------------------------------------------------


def test_flower_dp_wrappers_have_the_hooks_with_the_pinned_signatures():
    for cls in FLOWER_WRAPPERS:
        check_dp_wrapper_hooks(cls)  # raises if a hook is missing or takes other arguments
    adaptive = inspect.signature(DifferentialPrivacyServerSideAdaptiveClipping._noisy_fraction)
    assert list(adaptive.parameters) == ["self", "count", "total"]
    assert list(inspect.signature(DifferentialPrivacyServerSideAdaptiveClipping._geometric_update).parameters) == [
        "self", "clipped_fraction"]
    assert set(DP_WRAPPER_HOOKS) == {"_add_noise_to_aggregated_arrays", "_noisy_fraction", "_geometric_update"}


def test_a_changed_hook_is_refused_loudly():
    class Renamed(DifferentialPrivacyServerSideAdaptiveClipping):
        _geometric_update = None  # as if upstream removed it

    class MoreArguments(DifferentialPrivacyServerSideFixedClipping):
        def _add_noise_to_aggregated_arrays(self, aggregated_arrays, stdv):  # noqa: D102
            return aggregated_arrays

    with pytest.raises(RuntimeError, match="_geometric_update"):
        check_dp_wrapper_hooks(Renamed)
    with pytest.raises(RuntimeError, match="_add_noise_to_aggregated_arrays"):
        check_dp_wrapper_hooks(MoreArguments)


class _Recording(DPWrapperHooks):
    """Adds 1 to every released coordinate and records what Flower asked for."""

    calls: list

    def add_noise(self, aggregated_arrays):
        self.calls.append("add_noise")
        return ArrayRecord({k: Array(v.numpy() + 1.0) for k, v in aggregated_arrays.items()})

    def noisy_clipped_fraction(self, count, total):
        self.calls.append(("noisy_clipped_fraction", count, total))
        return count / total

    def update_clipping_norm(self, clipped_fraction):
        self.calls.append(("update_clipping_norm", clipped_fraction))


def _release(wrapper, uploads):
    """One round of Flower's own ``aggregate_train`` on ``uploads`` (server-side clipping against zero)."""
    wrapper.current_arrays = ArrayRecord({"update": Array(np.zeros(3, np.float32))})
    replies = []
    for node, upload in enumerate(uploads, start=1):
        sent = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
        content = RecordDict({"arrays": ArrayRecord({"update": Array(upload)}), "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content, reply_to=sent))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    arrays, _ = wrapper.aggregate_train(1, replies)
    return arrays["update"].numpy()


def test_flower_aggregate_train_calls_the_hooks_fedpeft_overrides(fresh_task_identity):
    set_server_task_identity()
    uploads = [np.array([3.0, 0.0, 0.0], np.float32), np.array([0.0, 0.1, 0.0], np.float32)]

    fixed = dp_wrapper_class(DifferentialPrivacyServerSideFixedClipping, _Recording)(FedAvg(), 1.0, 1.0, 2)
    fixed.calls = []
    released = _release(fixed, uploads)
    assert fixed.calls == ["add_noise"]
    # Flower clipped to norm 1 and averaged; the only change after that is the override's.
    np.testing.assert_allclose(released, np.array([0.5, 0.05, 0.0]) + 1.0, rtol=1e-6)

    adaptive = dp_wrapper_class(DifferentialPrivacyServerSideAdaptiveClipping, _Recording)(
        FedAvg(), 1.0, 2, initial_clipping_norm=1.0, clipped_count_stddev=1.0)
    adaptive.calls = []
    _release(adaptive, uploads)
    assert ("noisy_clipped_fraction", 1, 2) in adaptive.calls, adaptive.calls  # one of two uploads was clipped
    assert ("update_clipping_norm", 0.5) in adaptive.calls and "add_noise" in adaptive.calls


def test_dp_wrapper_class_needs_the_hooks_mixin():
    with pytest.raises(TypeError, match="DPWrapperHooks"):
        dp_wrapper_class(DifferentialPrivacyServerSideFixedClipping, object)


# --- Flower's task identity ----------------------------------------------------------


def test_set_server_task_identity_stamps_new_messages_as_the_server(fresh_task_identity):
    with pytest.raises(RuntimeError):  # unset, Flower refuses to build a message
        Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=3)
    set_server_task_identity()
    msg = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=3)
    assert msg.metadata.src_node_id == SUPERLINK_NODE_ID and msg.metadata.run_id == 0
    assert TaskIdentity.task_id == 1


# --- transformers ----------------------------------------------------------------


def test_attention_function_replaced_is_what_a_model_calls_and_is_put_back(one_torch_thread):
    """BERT's and Llama's attention layers look their function up in ALL_ATTENTION_FUNCTIONS (local mapping
    first, each model's own eager function as the fallback): the replacement is called while the block runs,
    and afterwards the registry is exactly as it was."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from fedpeft.compat.transformers_internals import (attention_function_replaced, attention_implementation,
                                                       eager_attention_function)
    from fedpeft.models.tiny_bert import load_tiny_bert

    net, _ = load_tiny_bert(num_labels=2, dropout=0.0)
    impl = attention_implementation(net)
    assert impl == "sdpa"
    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    calls = []
    with attention_function_replaced(impl, lambda module, *a, **kw: calls.append(module) or previous(module, *a, **kw)) as previous:
        assert previous is ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"]
        net(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(calls) == net.config.num_hidden_layers
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before
    with attention_function_replaced("eager", lambda *a, **kw: None) as previous:
        assert previous is None  # eager: each model's own function
    assert "eager" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    layer = next(m for m in net.modules() if type(m).__name__ == "BertSelfAttention")
    assert eager_attention_function(layer).__module__ == "transformers.models.bert.modeling_bert"


def test_array_numpy_decodes_what_flowers_own_decode_gives():
    """The fast decode of a Flower Array equals Array.numpy() for every layout it takes, and hands the rest
    (Fortran order) to Flower's decode; the result is a writable array of its own."""
    from flwr.app import Array

    from fedpeft.compat.flwr_internals import array_numpy

    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(8, 384)).astype(np.float32), rng.normal(size=()).astype(np.float64),
             np.zeros((0, 3), np.float32), rng.integers(0, 9, (4, 5)), rng.normal(size=(3, 2)).astype(np.float16),
             rng.normal(size=(2, 3, 4)) > 0, np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32))]
    for values in cases:
        array = Array(values)
        got, want = array_numpy(array), array.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        got[...] = 0  # its own writable copy, not a view of the message's bytes
        np.testing.assert_array_equal(array.numpy(), want)
