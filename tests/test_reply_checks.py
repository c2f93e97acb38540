"""Malformed and hostile train replies are rejected with their reason, never aggregated, and never crash the server.

Property-based: hypothesis draws a malformation (a key dropped or added, a
shape or dtype changed, NaN or infinity written in, a norm beyond
``federation.max_update_norm``, a bad ``num-examples``, arrays that do not
decode) and applies it to one client's otherwise honest reply, for every
registered strategy. The round must go on with the other two clients and
give exactly the state it gives when only those two answer, with the bad
client in ``failed`` and a reason naming what was wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.compat.flwr_internals import set_server_task_identity
from fedpeft.server.flower_strategy import FlowerLoRAStrategy
from fedpeft.server.reply_checks import expected_upload, num_examples_problem, upload_problem
from fedpeft.wire import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID, to_array_record
from strategies import LoRAFactors, registry

RANK, IN, OUT = 4, 6, 5
NODES = {0: 1, 1: 2, 2: 3}


def initial():
    rng = np.random.default_rng(0)
    factors = {m: LoRAFactors(rng.normal(0, 0.1, (RANK, IN)).astype(np.float32), np.zeros((OUT, RANK), np.float32),
                              2.0) for m in ("layer.0.query", "layer.0.value")}
    extras = {"classifier.weight": rng.normal(0, 0.1, (2, OUT)).astype(np.float32)}
    return factors, extras


def server(name: str, max_update_norm: float = 0.0) -> FlowerLoRAStrategy:
    strategy = registry.get(name).from_params({})
    factors, extras = initial()
    state = strategy.initialize(factors, extras=extras)
    return FlowerLoRAStrategy(strategy, state, NODES, 3, 0, max_update_norm=max_update_norm)


def honest_upload(flower: FlowerLoRAStrategy, cid: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + cid)
    return {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype)
            for k, v in expected_upload(flower.strategy, flower.state, str(cid)).items()}


def reply(cid: int, arrays=None, metrics=None, record=None) -> Message:
    sent = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=NODES[cid])
    content = RecordDict({ARRAYS: record if record is not None else to_array_record(arrays),
                          METRICS: MetricRecord(metrics if metrics is not None else {NUM_EXAMPLES: 10 + cid,
                                                                                        PARTITION_ID: cid})})
    return Message(content, reply_to=sent)


MALFORMATIONS = ["drop-key", "extra-key", "shape", "dtype", "nan", "inf", "huge", "num-examples", "undecodable"]


def malformed(kind: str, arrays: dict[str, np.ndarray], key_index: int, bad_count) -> tuple[dict, dict, object]:
    """One client's reply spoilt by ``kind``: (arrays, metrics, a raw ArrayRecord or None)."""
    arrays = dict(arrays)
    key = sorted(arrays)[key_index % len(arrays)]
    metrics = {NUM_EXAMPLES: 12, PARTITION_ID: 2}
    record = None
    if kind == "drop-key":
        del arrays[key]
    elif kind == "extra-key":
        arrays["lora_A/layer.9.query"] = np.zeros((RANK, IN), np.float32)
    elif kind == "shape":
        arrays[key] = np.zeros(arrays[key].shape[:-1] + (arrays[key].shape[-1] + 1,), np.float32)
    elif kind == "dtype":
        arrays[key] = arrays[key].astype(np.float64)
    elif kind in ("nan", "inf"):
        arrays[key] = arrays[key].copy()
        arrays[key].flat[0] = np.nan if kind == "nan" else -np.inf
    elif kind == "huge":
        arrays[key] = (arrays[key] * 1e6).astype(np.float32)
    elif kind == "num-examples":
        metrics[NUM_EXAMPLES] = bad_count
    elif kind == "undecodable":
        record = to_array_record(arrays)
        record[key] = Array(dtype="float32", shape=(3, 3), stype="numpy.ndarray", data=b"not an array")
    return arrays, metrics, record


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    set_server_task_identity()  # new Messages need one, as under Flower's runtimes


@pytest.mark.parametrize("name", registry.available())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(MALFORMATIONS), key_index=st.integers(0, 20),
       bad_count=st.sampled_from([0, -3, 2.5, float("nan"), float("inf")]))  # what a MetricRecord can carry
def test_a_bad_reply_is_rejected_and_the_round_equals_the_honest_clients_alone(name, kind, key_index, bad_count):
    flower = server(name, max_update_norm=10.0)
    honest = [reply(c, honest_upload(flower, c)) for c in (0, 1)]
    arrays, metrics, record = malformed(kind, honest_upload(flower, 2), key_index, bad_count)
    flower.aggregate_train(1, [*honest, reply(2, arrays, metrics, record)])
    failed = flower.rounds[1].failed
    assert [f.get("client") for f in failed] == [2], failed
    assert failed[0]["reason"].startswith("rejected: "), failed

    alone = server(name, max_update_norm=10.0)
    alone.aggregate_train(1, [reply(c, honest_upload(alone, c)) for c in (0, 1)])
    for m, f in alone.state.factors.items():
        np.testing.assert_array_equal(flower.state.factors[m].A, f.A)
        np.testing.assert_array_equal(flower.state.factors[m].B, f.B)
    for k, v in alone.state.extras.items():
        np.testing.assert_array_equal(flower.state.extras[k], v)


@pytest.mark.parametrize("name", registry.available())
def test_honest_replies_pass_every_check(name):
    flower = server(name, max_update_norm=10.0)
    for cid in (0, 1, 2):
        assert upload_problem(honest_upload(flower, cid), expected_upload(flower.strategy, flower.state, str(cid)),
                              10.0) is None


def test_each_check_names_what_is_wrong():
    flower = server("fedit", max_update_norm=1.0)
    expected = expected_upload(flower.strategy, flower.state, "0")
    key = sorted(expected)[0]
    cases = {
        "missing 1 array(s), e.g. " + repr(key): {k: v for k, v in expected.items() if k != key},
        "1 unexpected array(s), e.g. 'lora_A/x'": {**expected, "lora_A/x": expected[key]},
        f"{key}: dtype float64, expected float32": {**expected, key: expected[key].astype(np.float64)},
        f"{key}: shape (1,), expected {expected[key].shape}": {**expected, key: np.zeros(1, np.float32)},
        f"{key}: 1 NaN or infinite value(s)": {**expected, key: np.where(np.arange(expected[key].size).reshape(
            expected[key].shape) == 0, np.nan, expected[key]).astype(np.float32)},
        "exceeds federation.max_update_norm = 1": {**expected, key: expected[key] + np.float32(5.0)},
    }
    for needle, arrays in cases.items():
        problem = upload_problem(arrays, expected, 1.0)
        assert problem is not None and needle in problem, (needle, problem)
    assert upload_problem({**expected, key: expected[key] + np.float32(5.0)}, expected, 0.0) is None  # no bound
    for value, needle in [(None, "no num-examples"), (0, "not positive"), (-2, "not positive"), (2.5, "whole"),
                          ("ten", "not a number"), (True, "not a number"), (float("inf"), "whole")]:
        assert needle in num_examples_problem(value), value
    assert num_examples_problem(7) is None and num_examples_problem(7.0) is None
