"""DP against the server it claims to resist: the server knows the code, the config and the seed.

Its randomness is secret (two DP runs with one seed differ, plain runs repeat),
a server replaying a client with every public value cannot reproduce the
upload, client-level DP releases only noised outputs, lost and rejected
replies keep the noise and the spend right, and the strengthened canary
audit catches a mechanism whose randomness follows from public values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedpeft.client.app import make_client_app
from fedpeft.validation import load_config
from fedpeft.engine import run_engine
from fedpeft.errors import ConfigError
from fedpeft.privacy import secret as secret_module
from fedpeft.privacy.dp_sgd import DPSGD, dp_optimizer, private_steps
from fedpeft.privacy.secret import OS_SECRET, SecretSource, secret_source
from fedpeft.runtime import runtime
from fedpeft.server.flower_strategy import FlowerLoRAStrategy, global_payload, payload_message
from fedpeft.server.inprocess_grid import InProcessGrid
from fedpeft.server.run_folder import RunFolder
from fedpeft.wire import ARRAYS, CONFIG, DP_SAMPLE_RATE, METRICS, from_array_record, to_array_record

TINY = ['model.name="tiny-bert"', 'federation.engine="inprocess"', "federation.num_clients=2", "federation.num_rounds=1",
        "train.local_steps=2", "train.batch_size=8", "data.max_examples_per_client=32", "data.max_test_examples=16",
        'data.partition="iid"', "model.max_length=16"]
SAMPLE = ['dp.mode="sample"', "dp.noise_multiplier=1.0", "dp.delta=1e-3"]


def public_generator(self, purpose, *key):
    """The flaw this suite guards against: randomness keyed by public values only."""
    return np.random.default_rng([secret_module._purpose_code(purpose), *(int(k) for k in key)])


def adapter_bytes(tmp_path, name, extra):
    run_engine(load_config(None, TINY + extra), tmp_path / name)
    return (tmp_path / name / "adapter" / "adapter_model.safetensors").read_bytes()


def test_dp_runs_with_one_seed_differ_and_plain_runs_repeat(tmp_path):
    assert adapter_bytes(tmp_path, "plain-a", []) == adapter_bytes(tmp_path, "plain-b", [])
    assert adapter_bytes(tmp_path, "dp-a", SAMPLE) != adapter_bytes(tmp_path, "dp-b", SAMPLE)
    summary = json.loads((tmp_path / "dp-a" / "summary.json").read_text())
    assert "CSPRNG" in summary["dp"]["randomness"]


def client_upload(cfg, server_round: int = 1) -> dict[str, np.ndarray]:
    """One train message to the real ClientApp on a fresh node: what the server would get, or replay."""
    rt = runtime(cfg)
    # Under sample-level DP the server sends sigma and the client's q from the run's DP plan.
    dp = ({"dp-noise-multiplier": cfg.dp.noise_multiplier, DP_SAMPLE_RATE: rt.dp_plan.sample_rates[0]}
          if cfg.dp.mode == "sample" else {})
    config = ConfigRecord({"server-round": server_round, "dp-prior-steps": 0, **dp})
    grid = InProcessGrid(make_client_app(cfg), 1)
    msg = payload_message(rt.model.initial, config, MessageType.TRAIN, 1)
    return from_array_record(grid.client_app(msg, grid.contexts[1]).content[ARRAYS])


def max_difference(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_a_server_replaying_a_client_with_every_public_value_cannot_reproduce_its_upload(tmp_path):
    plain = load_config(None, TINY)
    assert max_difference(client_upload(plain), client_upload(plain)) == 0.0
    private = load_config(None, TINY + SAMPLE)
    assert max_difference(client_upload(private), client_upload(private)) > 1e-4
    # The secret is all that differs: given the user's secret, the client repeats itself bit for bit.
    (tmp_path / "secret").write_text("only the clients know this")
    keyed = load_config(None, TINY + SAMPLE + [f'dp.secret_file="{tmp_path / "secret"}"'])
    assert max_difference(client_upload(keyed), client_upload(keyed)) == 0.0


def test_the_noise_is_what_differs_and_has_the_claimed_scale():
    """sigma = 0 with every example in the batch: two runs agree exactly (no other randomness);
    sigma = 2: the privatised gradients of two runs differ by noise of std sqrt(2) sigma C / B."""
    torch.manual_seed(0)
    model = torch.nn.Linear(400, 50)
    x, y = torch.randn(8, 400), torch.randint(0, 50, (8,))

    def private_gradient(sigma: float) -> np.ndarray:
        from opacus import GradSampleModule

        gsm = GradSampleModule(model, loss_reduction="mean")
        opt = dp_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), DPSGD(sigma, 0.5, 1.0), 8,
                           OS_SECRET.torch_generator("dp-sgd-noise"))
        loss = lambda idx: torch.nn.functional.cross_entropy(gsm(x[torch.as_tensor(idx)]), y[torch.as_tensor(idx)])
        next(private_steps(opt, [np.arange(8)], loss))
        grad = np.concatenate([p.grad.detach().numpy().ravel() for p in model.parameters()])
        gsm._close()
        return grad

    np.testing.assert_array_equal(private_gradient(0.0), private_gradient(0.0))
    difference = private_gradient(2.0) - private_gradient(2.0)
    assert difference.std() == pytest.approx(np.sqrt(2) * 2.0 * 0.5 / 8, rel=0.05)


def test_a_user_secret_file_must_be_readable_and_not_empty(tmp_path):
    (tmp_path / "empty").write_text("  \n")
    for path, words in ((tmp_path / "missing", "cannot be read"), (tmp_path / "empty", "is empty")):
        with pytest.raises(ConfigError, match=words):
            secret_source(load_config(None, TINY + SAMPLE + [f'dp.secret_file="{path}"']).dp)


def test_sample_level_dp_refuses_an_accountant_of_the_wrong_relation():
    with pytest.raises(ConfigError, match="replacing one example, which only 'pld' accounts"):
        load_config(None, TINY + SAMPLE + ['dp.accountant="rdp"'])
    with pytest.raises(ConfigError, match="client_eval"):
        load_config(None, TINY + ['dp.mode="client"', "federation.client_eval=true"])


def test_client_level_dp_releases_no_raw_client_statistic(tmp_path):
    cfg = load_config(None, TINY + ['dp.mode="client"', "dp.noise_multiplier=1.0", "dp.delta=0.1",
                                    "federation.num_clients=4", "federation.clients_per_round=2",
                                    "federation.num_rounds=2"])
    run_engine(cfg, tmp_path / "run")
    metrics = RunFolder(tmp_path / "run").read_metrics()
    for line in metrics[1:]:
        assert line["train_loss"] is None and line["aggregation_error"] is None, line
        assert line["clients"] is None and "client_accuracy" not in line, line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "secret" in summary["dp"]["sampling"] and "CSPRNG" in summary["dp"]["randomness"]


def reply_to(node: int, content) -> Message:
    sent = Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    return Message(content, reply_to=sent)


def flower_strategy(cfg):
    rt = runtime(cfg)
    strategy = rt.strategy
    state = strategy.initialize(rt.model.initial.factors, extras=rt.model.initial.extras)
    nodes = {c: c + 1 for c in range(cfg.federation.num_clients)}
    return FlowerLoRAStrategy(strategy, state, nodes, cfg.clients_per_round, cfg.federation.seed,
                              dp_plan=rt.dp_plan), rt


def test_under_client_dp_a_rejected_reply_counts_as_a_zero_update():
    cfg = load_config(None, TINY + ['dp.mode="client"', "dp.noise_multiplier=1.0", "dp.delta=0.1",
                                    "federation.num_clients=3"])
    flower, rt = flower_strategy(cfg)
    InProcessGrid(make_client_app(cfg), 1)  # sets the task identity messages need
    sent = global_payload(flower.state).arrays()
    keys = flower.private_keys()
    moved = {k: (v + 1.0 if k in keys else v) for k, v in sent.items()}
    good = RecordDict({ARRAYS: to_array_record(moved), METRICS: MetricRecord({"num-examples": 1})})
    bad = RecordDict({ARRAYS: to_array_record({k: v[..., :1] for k, v in moved.items()}),
                      METRICS: MetricRecord({"num-examples": 1})})
    arrays, _ = flower.aggregate_train(1, [reply_to(1, good), reply_to(2, good), reply_to(3, bad)])
    released = from_array_record(arrays)
    log_ = flower.rounds[1]
    # Why a reply was rejected is computed from the client's data, which no noise covers: no line for it.
    assert log_.failed == []
    # Two clients moved every private coordinate by 1, the third counts as 0: the mean is 2/3, not 1.
    for k in keys:
        np.testing.assert_allclose(released[k], sent[k] + 2.0 / 3.0, rtol=1e-5, atol=1e-5)


def test_under_client_dp_the_wrapper_aggregates_past_a_malformed_and_a_lost_reply():
    """Through Flower's DP wrapper (which clips before fedpeft's adapter sees a reply, and skips a round with any
    error reply): a reply of the wrong shapes and a lost one are screened out first and count as zero updates."""
    from fedpeft.privacy.client_level import wrap_client_dp

    cfg = load_config(None, TINY + ['dp.mode="client"', "dp.noise_multiplier=1.0", "dp.delta=0.1",
                                    "federation.num_clients=3"])
    flower, rt = flower_strategy(cfg)
    wrapper = wrap_client_dp(flower, cfg.dp, 1.0, 3, flower.private_keys())
    grid = InProcessGrid(make_client_app(cfg), 3)
    start = to_array_record(global_payload(flower.state).arrays())
    messages = list(wrapper.configure_train(1, start, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    by_node = {m.metadata.src_node_id: m for m in replies}
    arrays = from_array_record(by_node[2].content[ARRAYS])
    by_node[2].content[ARRAYS] = to_array_record({k: v[..., :1] for k, v in arrays.items()})
    lost = Message(Error(code=0, reason="worker died"), reply_to=messages[2])
    released, _ = wrapper.aggregate_train(1, [by_node[1], by_node[2], lost])
    assert released is not None  # aggregated (Flower's wrapper alone returns None on any error reply)
    failed = flower.rounds[1].failed
    # The lost client is listed (without its id: who was sampled stays secret); the malformed reply, rejected
    # for what it holds, is not (its reason is computed from its data) but counts as a zero update.
    assert failed == [{"reason": "worker died"}], failed


def test_spend_is_recorded_for_rejected_and_lost_replies():
    cfg = load_config(None, TINY + SAMPLE + ["federation.num_clients=3"])
    flower, rt = flower_strategy(cfg)
    grid = InProcessGrid(make_client_app(cfg), 3)
    messages = list(flower.configure_train(1, to_array_record(global_payload(flower.state).arrays()), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    by_node = {m.metadata.src_node_id: m for m in replies}
    # Client 1 sends a malformed upload (rejected); client 2's reply is lost (an error).
    arrays = from_array_record(by_node[2].content[ARRAYS])
    by_node[2].content[ARRAYS] = to_array_record({k: v[..., :1] for k, v in arrays.items()})
    lost = Message(Error(code=0, reason="worker died"), reply_to=messages[2])
    flower.aggregate_train(1, [by_node[1], by_node[2], lost])
    steps = cfg.train.local_steps
    assert flower.dp_steps == {0: steps, 1: steps, 2: steps}
    for c in range(3):
        assert flower.dp_epsilon[c] == pytest.approx(rt.dp_plan.epsilon_after(c, steps))


def test_the_replaying_audit_catches_public_randomness_and_passes_secret_randomness(monkeypatch, torch_threads):
    from fedpeft.audit.client_path import client_path_audit
    from fedpeft.audit.empirical import client_level_audit

    torch_threads(1)
    # Through the real client, 100 trials a side already put the ceiling above the accountant's
    # epsilon (has_power) and a perfect replay's lower bound (about 3.5 at 95%) above it too; the
    # server's audit samples 5 of 10 clients, so the canary shows in half the rounds: 300 (cheap).
    TRIALS, SERVER_TRIALS = 100, 300
    honest_client = client_path_audit(4.0, 1.0, trials=TRIALS, seed=1)
    honest_server = client_level_audit(4.0, 1.0, num_clients=10, clients_per_round=5, trials=SERVER_TRIALS, dim=256, seed=1)
    for audit in (honest_client, honest_server):
        assert audit.has_power, audit  # the ceiling is above the accountant: a violation could show
        assert audit.epsilon_lower <= audit.epsilon_accountant, audit
    monkeypatch.setattr(SecretSource, "generator", public_generator)
    seeded_client = client_path_audit(4.0, 1.0, trials=60, seed=1)  # a perfect replay: 60 a side bound it near 2.9
    seeded_server = client_level_audit(4.0, 1.0, num_clients=10, clients_per_round=5, trials=SERVER_TRIALS, dim=256, seed=1)
    assert seeded_client.epsilon_lower > seeded_client.epsilon_accountant and seeded_client.test == "exact replay"
    assert seeded_server.epsilon_lower > seeded_server.epsilon_accountant, seeded_server
    assert seeded_server.test.startswith("replay")


def test_fedpeft_audit_runs_the_sample_level_canary_audit_through_the_real_client():
    from fedpeft.audit.dp import victim_dp
    from fedpeft.audit.report import empirical_section
    from fedpeft.audit.runner import empirical_privacy

    cfg = load_config(None, ['dp.mode="sample"', "dp.noise_multiplier=2.0", "dp.delta=1e-5", "audit.canary_trials=40"])
    settings = cfg.audit
    result = empirical_privacy(cfg, settings, victim_dp(cfg.dp, settings.local_steps, settings.batch_size)).to_dict()
    assert result["unit"] == "sample" and result["relation"] == "replace-one"
    assert "real ClientApp" in result["details"] and result["test"] in ("exact replay", "canary gradient step")
    assert result["epsilon_lower"] <= result["epsilon_accountant"]
    text = "\n".join(empirical_section(result))
    assert "replays the mechanism" in text and "ceiling" in text
    assert not result["has_power"] and "**No power:**" in text  # 40 trials cannot reach the accountant's epsilon


def test_a_resumed_server_keeps_the_spend_of_rejected_and_lost_replies():
    """The checkpoint holds every step on record; a fresh server sends it as each client's prior,
    and a client (on whichever node, in whichever process) rebuilds its accountant from that prior."""
    from fedpeft.client.app import client_accountant
    from fedpeft.server.privacy_log import dp_checkpoint

    cfg = load_config(None, TINY + SAMPLE + ["federation.num_clients=3"])
    flower, rt = flower_strategy(cfg)
    grid = InProcessGrid(make_client_app(cfg), 3)
    messages = list(flower.configure_train(1, to_array_record(global_payload(flower.state).arrays()), ConfigRecord(), grid))
    replies = {m.metadata.src_node_id: m for m in grid.send_and_receive(messages)}
    arrays = from_array_record(replies[1].content[ARRAYS])
    replies[1].content[ARRAYS] = to_array_record({k: v[..., :1] for k, v in arrays.items()})  # rejected
    flower.aggregate_train(1, [replies[1], Message(Error(code=0, reason="lost"), reply_to=messages[1]), replies[3]])
    saved = json.loads(json.dumps(dp_checkpoint(flower, flower)))  # what progress.json holds
    resumed = FlowerLoRAStrategy(flower.strategy, flower.state, flower.nodes, 3, cfg.federation.seed,
                                 round_offset=1, dp_plan=rt.dp_plan, dp_steps=saved["steps"], dp_epsilon=saved["epsilon"])
    again = list(resumed.configure_train(1, to_array_record(global_payload(resumed.state).arrays()), ConfigRecord(), grid))
    steps = cfg.train.local_steps
    assert [int(m.content[CONFIG]["dp-prior-steps"]) for m in again] == [steps] * 3
    q = rt.dp_plan.sample_rates[0]
    accountant = client_accountant("pld", (cfg.dp.noise_multiplier, q, steps))
    assert accountant.steps == steps and accountant.epsilon(cfg.dp.delta) == pytest.approx(resumed.dp_epsilon[0])
