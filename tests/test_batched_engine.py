"""``federation.engine = "batched"``: the same federation as the in-process engine, clients trained together."""

from __future__ import annotations

import numpy as np
import pytest

import fedpeft
from fedpeft.client.batched import batched_unsupported, train_together
from fedpeft.server import batched_grid
from fedpeft.errors import ConfigError
from fedpeft.validation import load_config


def _rounds(metrics):
    return [value for m in metrics for value in (m["accuracy"], m["loss"])]


CLIENT_CLIPPING = ['dp.mode="client"', 'dp.clip_on="client"', "dp.noise_multiplier=0.5", "dp.delta=0.1",
                   "dp.max_grad_norm=0.05"]  # a bound the updates exceed: the clipping shows in the replies
SAMPLE_DP = ['dp.mode="sample"', "dp.noise_multiplier=1.0", "dp.delta=1e-5", "dp.max_grad_norm=0.5"]


@pytest.mark.parametrize(("batch_clients", "extra"), [
    (0, []), (2, []), (0, ["model.dropout=0.1", "peft.dropout=0.1"]), (0, CLIENT_CLIPPING),
    (2, [*CLIENT_CLIPPING, 'dp.clipping="adaptive"', "dp.clipped_count_stddev=1.0"]),
    # Uncapped Dirichlet shards (1,186 to 7,329 examples): each client its own q.
    (0, [*SAMPLE_DP, "data.max_examples_per_client=0"]),
    (2, [*SAMPLE_DP, "data.max_examples_per_client=0", "model.dropout=0.1", "peft.dropout=0.1"]),
], ids=["all-at-once", "chunks-of-2", "dropout-on", "client-side-clipping", "client-side-adaptive-clipping",
        "sample-level-dp", "sample-level-dp-chunks-of-2-dropout-on"])
def test_batched_engine_equals_inprocess(tmp_path, tiny_federation, read_run, monkeypatch, batch_clients, extra):
    # Three clients of different shard sizes (Dirichlet), two rounds, dropout off unless ``extra`` turns it on.
    base = [o for o in tiny_federation if not o.startswith(("federation.num_clients", "federation.num_rounds",
                                                             "data.partition", "train.local_steps"))]
    base += ["federation.num_clients=3", "federation.num_rounds=2", "train.local_steps=2", 'data.partition="dirichlet"',
             "model.dropout=0.0", "data.max_examples_per_client=12", *extra]
    private = any(o.startswith("dp.") for o in extra)
    if private:  # the server's (or each client's DP-SGD) noise follows from the user's secret: the same in both runs
        (tmp_path / "secret").write_text("a secret only the user has")
        base.append(f'dp.secret_file="{tmp_path / "secret"}"')
    fedpeft.run(overrides=[*base, 'federation.engine="inprocess"'], out=tmp_path / "inprocess")
    passes = []  # clients per batched pass that succeeded: proves the batched path ran, in the chunks asked for

    def counted(handlers, messages, contexts):
        replies = train_together(handlers, messages, contexts)  # a pass that raises falls back: not counted
        passes.append(len(messages))
        return replies

    monkeypatch.setattr(batched_grid, "train_together", counted)
    fedpeft.run(overrides=[*base, 'federation.engine="batched"', f"federation.batch_clients={batch_clients}"],
                out=tmp_path / "batched")
    (one, one_rounds), (two, two_rounds) = read_run(tmp_path / "inprocess"), read_run(tmp_path / "batched")
    assert passes == ([3, 3] if batch_clients == 0 else [2, 1, 2, 1])
    assert len(one_rounds) == len(two_rounds) == 3  # the initial evaluation and two rounds
    assert _rounds(two_rounds) == pytest.approx(_rounds(one_rounds), rel=1e-4, abs=1e-4)
    assert two["final_accuracy"] == pytest.approx(one["final_accuracy"], abs=1e-4)
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    assert (two["bytes_up"], two["bytes_down"]) == (one["bytes_up"], one["bytes_down"])
    assert two["config"]["federation"]["engine"] == "batched"
    # Training moved the model: equality of two untrained runs would prove nothing.
    assert one_rounds[-1]["loss"] != one_rounds[0]["loss"]
    if private:  # equal only if the batched replies went through the clients' clipping mods too
        assert two["epsilon"] == one["epsilon"] is not None
    if 'dp.mode="sample"' in extra:  # each client accounted its own q and steps, as when trained alone
        assert two["dp"]["epsilon_per_client"] == one["dp"]["epsilon_per_client"]
        assert two["dp"]["steps_per_client"] == one["dp"]["steps_per_client"]
        assert len(set(one["dp"]["sample_rate_per_client"].values())) > 1  # shards of different sizes: q differs


def test_sample_level_dp_trains_batched_without_falling_back(tiny_federation, caplog):
    from fedpeft.client import make_client_app
    from fedpeft.server.batched_grid import BatchedGrid

    sample = load_config(None, [*tiny_federation, 'federation.engine="batched"', *SAMPLE_DP])
    assert batched_unsupported(sample) == ""
    with caplog.at_level("WARNING", logger="fedpeft.server.batched_grid"):
        grid = BatchedGrid(make_client_app(sample), sample)
    assert grid.fallback_reason == "" and "one by one" not in caplog.text
    assert batched_unsupported(load_config(None, ['federation.engine="batched"'])) == ""  # dropout on included


def test_batch_clients_without_the_batched_engine_is_a_config_error():
    with pytest.raises(ConfigError, match="federation.batch_clients = 4 sizes the batched engine's passes; set "
                                          "federation.engine = 'batched'"):
        load_config(None, ["federation.batch_clients=4"])


def test_a_failing_client_fails_alone_and_the_others_equal_sequential_replies(tiny_federation, caplog):
    from flwr.app import ConfigRecord, MessageType

    from fedpeft.client import make_client_app
    from fedpeft.runtime import runtime
    from fedpeft.server.batched_grid import BatchedGrid
    from fedpeft.server.flower_strategy import payload_message
    from fedpeft.server.inprocess_grid import InProcessGrid
    from fedpeft.wire import ARRAYS, METRICS, SERVER_ROUND, from_array_record
    from strategies import LoRAFactors, Payload

    cfg = load_config(None, [*tiny_federation, "federation.num_clients=3", "model.dropout=0.0", "train.local_steps=2",
                             'federation.engine="batched"'])
    good = runtime(cfg).model.initial
    module, f = next(iter(good.factors.items()))
    bad = Payload(factors={**good.factors, module: LoRAFactors(A=f.A[:, :-1], B=f.B, scaling=f.scaling)},
                  extras=good.extras)  # A one column short: this client's set-up raises

    def messages():
        return [payload_message(p, ConfigRecord({SERVER_ROUND: 1}), MessageType.TRAIN, node)
                for node, p in ((1, good), (2, bad), (3, good))]

    with caplog.at_level("WARNING", logger="fedpeft.server.batched_grid"):
        batched = list(BatchedGrid(make_client_app(cfg), cfg).send_and_receive(messages()))
    assert "a batched pass failed; its 3 train messages run one by one" in caplog.text
    alone = list(InProcessGrid(make_client_app(cfg), 3).send_and_receive(messages()))
    assert [r.has_error() for r in batched] == [False, True, False] == [r.has_error() for r in alone]
    for mine, theirs in zip(batched[::2], alone[::2]):
        timed = ("compute_s",)  # wall-clock seconds: present in both, equal in neither
        mine_m, theirs_m = dict(mine.content[METRICS]), dict(theirs.content[METRICS])
        assert all(mine_m.pop(k) > 0 and theirs_m.pop(k) > 0 for k in timed)
        assert mine_m == pytest.approx(theirs_m, rel=1e-5)
        a, b = from_array_record(mine.content[ARRAYS]), from_array_record(theirs.content[ARRAYS])
        assert set(a) == set(b)
        for key in b:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)
