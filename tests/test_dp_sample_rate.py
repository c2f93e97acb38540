"""One source for the sample rate q: the DP plan computes it, the server sends it, the client accounts it."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedpeft.client.app import make_client_app
from fedpeft.compat.flwr_internals import set_server_task_identity
from fedpeft.privacy import create_accountant
from fedpeft.validation import load_config
from fedpeft.runtime import runtime
from fedpeft.server.flower_strategy import FlowerLoRAStrategy
from fedpeft.wire import CONFIG, DP_SAMPLE_RATE, METRICS

SETTINGS = ['federation.engine="inprocess"', "federation.num_clients=4", "federation.clients_per_round=4",
            "federation.num_rounds=2", "train.local_steps=1", "train.batch_size=8", "data.max_test_examples=16",
            'data.partition="dirichlet"', "data.alpha=0.5", 'model.name="tiny-bert"',
            'dp.mode="sample"', "dp.noise_multiplier=1.3", "dp.delta=1e-4"]


def fresh_context(cid: int) -> Context:
    return Context(run_id=0, node_id=cid + 1, node_config={"partition-id": cid, "num-partitions": 4},
                   state=RecordDict(), run_config={})


def test_the_client_accounts_exactly_the_plans_q_sent_with_sigma():
    set_server_task_identity()
    cfg = load_config(None, SETTINGS)
    rt = runtime(cfg)
    plan = rt.dp_plan
    assert len(set(plan.sample_rates.values())) > 1, "equal shards cannot tell one q from another"
    initial = rt.model.initial
    state = rt.strategy.initialize(initial.factors, extras=initial.extras)
    server = FlowerLoRAStrategy(rt.strategy, state, {c: c + 1 for c in range(4)}, 4, cfg.federation.seed, dp_plan=plan)
    messages = list(server.configure_train(1, ArrayRecord(), ConfigRecord(), None))
    app = make_client_app(cfg)
    for msg in messages:
        cid = msg.metadata.dst_node_id - 1
        config = msg.content[CONFIG]
        assert config[DP_SAMPLE_RATE] == plan.sample_rates[cid]
        assert config["dp-noise-multiplier"] == plan.noise_multiplier
        reply = app(msg, fresh_context(cid))
        assert reply.content[METRICS]["dp-epsilon"] == plan.epsilon_after(cid, cfg.train.local_steps)


def test_the_client_uses_the_received_q_rather_than_recomputing_it():
    set_server_task_identity()
    cfg = load_config(None, SETTINGS)
    rt = runtime(cfg)
    plan = rt.dp_plan
    initial = rt.model.initial
    state = rt.strategy.initialize(initial.factors, extras=initial.extras)
    server = FlowerLoRAStrategy(rt.strategy, state, {c: c + 1 for c in range(4)}, 4, cfg.federation.seed, dp_plan=plan)
    msg = next(iter(server.configure_train(1, ArrayRecord(), ConfigRecord(), None)))
    cid = msg.metadata.dst_node_id - 1
    sent = plan.sample_rates[cid] / 2  # not batch_size / n: only the message can be its source
    msg.content[CONFIG][DP_SAMPLE_RATE] = sent
    reply = make_client_app(cfg)(msg, fresh_context(cid))
    accounted = create_accountant("pld", relation="replace-one").step(plan.noise_multiplier, sent, cfg.train.local_steps)
    assert reply.content[METRICS]["dp-epsilon"] == accounted.epsilon(cfg.dp.delta)
    assert accounted.epsilon(cfg.dp.delta) != plan.epsilon_after(cid, cfg.train.local_steps)


def test_a_train_message_without_the_plans_q_is_refused():
    set_server_task_identity()
    cfg = load_config(None, SETTINGS)
    rt = runtime(cfg)
    initial = rt.model.initial
    state = rt.strategy.initialize(initial.factors, extras=initial.extras)
    server = FlowerLoRAStrategy(rt.strategy, state, {c: c + 1 for c in range(4)}, 4, cfg.federation.seed,
                                dp_plan=rt.dp_plan)
    msg = next(iter(server.configure_train(1, ArrayRecord(), ConfigRecord(), None)))
    del msg.content[CONFIG][DP_SAMPLE_RATE]
    with pytest.raises(ValueError, match="dp-sample-rate"):
        make_client_app(cfg)(msg, fresh_context(msg.metadata.dst_node_id - 1))
