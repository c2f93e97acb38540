"""Virtual clients: a few Flower nodes run any number of clients (README, "Engines").

Nodes are executors and clients are data: each message names its client, the
server deals each round's sampled clients to the nodes in turn and asks only
the nodes to get ready, so start-up does not grow with the federation. These
tests hold what that must not change (which clients train, what they compute,
the DP accounting) and what it adds (clients with no examples are skipped).
Timings are benchmarks (``fedpeft bench``: ``bench_scale``), not tests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict

from fedpeft.client import make_client_app
from fedpeft.data import load_dataset, partition_indices
from fedpeft.errors import ConfigError
from fedpeft.privacy import create_accountant
from fedpeft.runtime import runtime
from fedpeft.sampling import sample_clients
from fedpeft.server.app import run_federation
from fedpeft.server.flower_strategy import FlowerLoRAStrategy
from fedpeft.server.inprocess_grid import InProcessGrid
from fedpeft.validation import load_config
from fedpeft.wire import CLIENT_ID, CONFIG, DP_EPSILON, DP_STEPS, METRICS, PARTITION_ID
from tests.conftest import without_timings

TINY = ['model.name="tiny-bert"', "model.max_length=16", 'federation.engine="inprocess"', "train.local_steps=1",
        "train.batch_size=4", "data.max_test_examples=16", 'data.partition="iid"', "model.dropout=0.0"]
ROWS = 11_527  # rotten_tomatoes training rows at data.test_fraction = 0.1
# More clients than rows: clients ROWS.. hold nothing. Seed 3 samples both kinds in both rounds.
BIG = TINY + ["federation.num_clients=20000", "federation.clients_per_round=6", "federation.num_rounds=2",
              "federation.seed=3"]


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping (message type, node, client id) of every message it delivers."""

    def __init__(self, client_app, num_nodes: int):
        super().__init__(client_app, num_nodes)
        self.delivered: list[tuple[str, int, int | None]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            config = m.content.config_records.get(CONFIG)
            cid = int(config[CLIENT_ID]) if config is not None and CLIENT_ID in config else None
            self.delivered.append((m.metadata.message_type, m.metadata.dst_node_id, cid))
        return super().send_and_receive(messages, timeout=timeout)


def run(tmp_path, name: str, overrides: list[str]):
    cfg = load_config(None, overrides)
    grid = RecordingGrid(make_client_app(cfg), cfg.num_nodes)
    out = tmp_path / name
    summary = run_federation(grid, cfg, out)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, grid, summary, metrics, out


@pytest.fixture(scope="module")
def big_runs(tmp_path_factory):
    """The same 20,000-client federation on 2 and on 3 nodes."""
    tmp = tmp_path_factory.mktemp("scale")
    return {nodes: run(tmp, f"nodes{nodes}", BIG + [f"federation.num_nodes={nodes}"]) for nodes in (2, 3)}


def test_iid_shards_are_flwr_datasets_iid_partitioner_shards():
    """fedpeft cuts every iid shard in one call; they are the shards IidPartitioner.load_partition gives."""
    from flwr_datasets.partitioner import IidPartitioner

    from fedpeft.data.partition import _STREAM_IID, _hf_dataset, _rng

    data = load_dataset("rotten_tomatoes")
    order = _rng(5, _STREAM_IID).permutation(len(data.train_labels))
    for n in (7, 300):
        partitioner = IidPartitioner(num_partitions=n)
        partitioner.dataset = _hf_dataset(data.train_labels, data.train_groups, order)
        ours = partition_indices(data, "iid", n, seed=5)
        for i in (0, 1, n // 2, n - 1):
            assert np.array_equal(ours[i], np.sort(np.asarray(partitioner.load_partition(i)["idx"]))), (n, i)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_100000_clients_cover_every_row_once_and_the_rest_hold_none(method):
    data = load_dataset("rotten_tomatoes")
    assert len(data.train_labels) == ROWS
    parts = partition_indices(data, method, 100_000, alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert len(parts) == 100_000 and sizes.sum() == ROWS
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(ROWS))
    assert (sizes == 0).sum() >= 100_000 - ROWS
    if method == "iid":  # contiguous shards: the first ROWS clients hold one row each
        assert sizes[:ROWS].tolist() == [1] * ROWS and not sizes[ROWS:].any()


def test_the_seeded_sampled_clients_train_and_empty_ones_are_skipped_with_a_note(big_runs):
    cfg, grid, summary, metrics, _ = big_runs[2]
    rt = runtime(cfg)
    empty = {c for c in range(cfg.federation.num_clients) if len(rt.shards[c]) == 0}
    assert len(empty) == 20_000 - ROWS
    assert [m["round"] for m in metrics] == [0, 1, 2] and summary["num_clients"] == 20_000
    for m in metrics[1:]:
        sampled = sample_clients(20_000, 6, 3, m["round"])
        assert m["clients"] == sampled
        skipped = [c for c in sampled if c in empty]
        assert 0 < len(skipped) < len(sampled)
        assert m["skipped"] == [{"client": c, "reason": "no examples"} for c in skipped]
        assert m["failed"] == []
    trained = [(node, cid) for kind, node, cid in grid.delivered if kind == MessageType.TRAIN]
    expected = []
    for r in (1, 2):
        sent = [c for c in sample_clients(20_000, 6, 3, r) if c not in empty]
        expected += [(1 + i % 2, c) for i, c in enumerate(sent)]  # dealt to the 2 nodes in turn
    assert trained == expected


def test_discovery_asks_the_nodes_not_the_clients(big_runs):
    for nodes, (_, grid, *_rest) in big_runs.items():
        queries = [node for kind, node, _ in grid.delivered if kind == MessageType.QUERY]
        assert sorted(queries) == list(range(1, nodes + 1))
        assert len(grid.contexts) == nodes


def test_the_number_of_nodes_does_not_change_the_run(big_runs):
    (_, _, two, lines2, out2), (_, _, three, lines3, out3) = big_runs[2], big_runs[3]
    assert without_timings(lines2) == without_timings(lines3)
    for key in ("final_accuracy", "final_loss", "bytes_up", "bytes_down"):
        assert two[key] == three[key], key
    adapter = "adapter/adapter_model.safetensors"
    assert (out2 / adapter).read_bytes() == (out3 / adapter).read_bytes()


def test_a_client_on_another_node_each_round_keeps_its_dp_accounting(tmp_path):
    """Sample-level DP: the accountant follows the client, not the node it ran on."""
    cfg, grid, summary, metrics, _ = run(tmp_path, "dp", TINY + [
        "federation.num_clients=5", "federation.clients_per_round=3", "federation.num_rounds=2",
        "federation.num_nodes=2", "train.local_steps=2", "data.max_examples_per_client=12",
        'dp.mode="sample"', "dp.noise_multiplier=1.2", "dp.delta=1e-3", "federation.seed=2"])
    placed = {}
    for kind, node, cid in grid.delivered:
        if kind == MessageType.TRAIN:
            placed.setdefault(cid, []).append(node)
    movers = [c for c, nodes in placed.items() if len(nodes) == 2 and nodes[0] != nodes[1]]
    assert movers, placed  # seed 2 deals clients 1 and 3 to node 1 in one round and node 2 in the other
    plan = runtime(cfg).dp_plan
    for c in movers:
        steps = 2 * cfg.train.local_steps
        assert summary["dp"]["steps_per_client"][str(c)] == steps
        fresh = create_accountant("pld", relation="replace-one").step(plan.noise_multiplier, plan.sample_rates[c], steps)
        assert metrics[2]["epsilon_of_round_clients"][str(c)] == pytest.approx(fresh.epsilon(cfg.dp.delta), rel=1e-12)


def test_a_message_runs_as_the_client_it_names_else_as_the_nodes_partition_id():
    """``flwr run .`` nodes carry a partition-id; fedpeft's messages name their client, which wins."""
    cfg = load_config(None, TINY + ["federation.num_clients=4", "federation.num_nodes=1"])
    rt = runtime(cfg)
    state = rt.strategy.initialize(rt.model.initial.factors, extras=rt.model.initial.extras)
    app = make_client_app(cfg)
    InProcessGrid(app, 1)  # sets the task identity messages need
    flower = FlowerLoRAStrategy(rt.strategy, state, [1], 1, cfg.federation.seed, num_clients=4)
    msg = next(iter(flower.configure_train(1, ArrayRecord(), ConfigRecord(), None)))
    named = int(msg.content[CONFIG][CLIENT_ID])

    def context(partition: int) -> Context:
        return Context(run_id=0, node_id=1, node_config={PARTITION_ID: partition, "num-partitions": 4},
                       state=RecordDict(), run_config={})

    other = (named + 1) % 4
    assert app(msg, context(other)).content[METRICS][PARTITION_ID] == named
    del msg.content[CONFIG][CLIENT_ID]
    reply = app(msg, context(other))
    assert reply.content[METRICS][PARTITION_ID] == other
    assert reply.content[METRICS]["num-examples"] == len(rt.shards[other])


def test_more_nodes_than_clients_is_a_config_error():
    with pytest.raises(ConfigError, match=r"federation\.num_nodes = 5 exceeds federation\.num_clients = 4; "
                                          r"use a value in 0\.\.4"):
        load_config(None, TINY + ["federation.num_clients=4", "federation.num_nodes=5"])
    assert load_config(None, TINY + ["federation.num_clients=40", "federation.clients_per_round=8"]).num_nodes == 8
