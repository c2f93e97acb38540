"""A Flower ``Strategy`` that runs any fedpeft (numpy) strategy.

The fedpeft strategy decides what each client is sent and how updates merge;
this adapter does the Flower side: seeded client sampling, one message per
client (payloads may differ per client), turning replies back into
``ClientUpdate`` objects, and counting the bytes of every array that crosses
the wire. Because it is a plain ``flwr.serverapp.strategy.Strategy``, Flower's
own wrappers (differential privacy, robust aggregation) can wrap it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedpeft.wire import ARRAYS, CONFIG, METRICS, SCALINGS, from_array_record, nbytes, scalings_record, to_array_record
from strategies import Payload, ServerState
from strategies import Strategy as LoRAStrategy


def global_payload(state: ServerState) -> Payload:
    """The global model: shared factors, residuals and extras (no per-client parts)."""
    return Payload(factors=dict(state.factors), residuals=dict(state.residuals), extras=dict(state.extras))


def aggregation_error(before: ServerState, after: ServerState, updates, weights) -> float:
    """How far the new global update is from the exact weighted mean of the clients'.

    Per module, ``||(delta_after - residual_before) - sum_i p_i s_i B_i A_i||_F``
    over the norm of that exact mean, averaged over modules: 0 for the exact
    rules, the covariance term for FedIT.
    """
    errors = []
    for m in after.factors:
        exact = sum(w * u.factors[m].delta(np.float64) for w, u in zip(weights, updates) if m in u.factors)
        if isinstance(exact, int):  # no client touched this module
            continue
        residual = before.residuals.get(m)
        got = after.effective_delta(m, dtype=np.float64) - (0.0 if residual is None else residual.astype(np.float64))
        norm = np.linalg.norm(exact)
        errors.append(np.linalg.norm(got - exact) / norm if norm > 0 else np.linalg.norm(got - exact))
    return float(np.mean(errors)) if errors else 0.0


def payload_message(payload: Payload, config: ConfigRecord, message_type: str, node_id: int) -> Message:
    """One message carrying a strategy payload: arrays, config and scalings."""
    content = RecordDict(
        {ARRAYS: to_array_record(payload.arrays()), CONFIG: config, SCALINGS: scalings_record(payload.scalings())}
    )
    return Message(content=content, message_type=message_type, dst_node_id=node_id)


def sample_clients(num_clients: int, per_round: int, seed: int, server_round: int) -> list[int]:
    """The clients of one round: a seeded draw without replacement, sorted."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


@dataclass
class RoundLog:
    """What happened on the wire in one round."""

    clients: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    failed: list[dict] = field(default_factory=list)
    train_loss: float | None = None
    aggregation_error: float | None = None
    client_accuracy: dict[int, float] | None = None


class FlowerLoRAStrategy(FlowerStrategy):
    """Runs a fedpeft strategy inside Flower's ``Strategy.start`` loop.

    Parameters
    ----------
    strategy : strategies.Strategy
        The aggregation rule.
    state : strategies.ServerState
        Its initial state.
    node_ids : dict[int, int]
        fedpeft client id (the partition id) -> Flower node id.
    clients_per_round : int
        Clients sampled each round.
    seed : int
        Seed of the client sampling.
    client_eval : bool
        Also evaluate on every client's shard after each round.
    round_offset : int
        Rounds already done before this start (a resumed run): Flower counts
        from 1 again, fedpeft's rounds, seeds and logs stay absolute.
    """

    def __init__(self, strategy: LoRAStrategy, state: ServerState, node_ids: dict[int, int], clients_per_round: int,
                 seed: int, client_eval: bool = False, round_offset: int = 0):
        self.client_eval = client_eval
        self.round_offset = round_offset
        self.strategy = strategy
        self.state = state
        self.node_ids = dict(node_ids)
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.rounds: dict[int, RoundLog] = {}
        self._client_of_node = {n: c for c, n in node_ids.items()}

    def summary(self) -> None:
        log(INFO, "\t├──> fedpeft strategy: %s", self.strategy.describe())
        log(INFO, "\t└──> clients per round: %d of %d", self.clients_per_round, len(self.node_ids))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        clients = sample_clients(len(self.node_ids), self.clients_per_round, self.seed, server_round)
        log_ = self.rounds[server_round] = RoundLog(clients=clients)
        messages = []
        for cid in clients:
            payload = self.strategy.payload_for(self.state, str(cid))
            log_.bytes_down += payload.nbytes
            train_config = ConfigRecord({**dict(config), "server-round": server_round})
            messages.append(payload_message(payload, train_config, MessageType.TRAIN, self.node_ids[cid]))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        log_ = self.rounds.setdefault(server_round, RoundLog())
        updates, losses, weights = [], [], []
        for msg in replies:
            cid = self._client_of_node.get(msg.metadata.src_node_id, msg.metadata.src_node_id)
            if msg.has_error():
                log_.failed.append({"client": cid, "reason": msg.error.reason})
                continue
            arrays = from_array_record(msg.content[ARRAYS])
            metrics = dict(msg.content[METRICS])
            n = int(metrics["num-examples"])
            try:
                update = self.strategy.receive(self.state, str(cid), arrays, n, metrics=metrics)
            except ValueError as exc:  # a malformed upload is rejected, not aggregated
                log_.failed.append({"client": cid, "reason": f"rejected: {exc}"})
                continue
            log_.bytes_up += nbytes(arrays)
            updates.append(update)
            losses.append(float(metrics.get("train_loss", np.nan)))
            weights.append(n)
        if not updates:
            reasons = "; ".join(f"client {f['client']}: {f['reason']}" for f in log_.failed) or "no replies"
            raise RuntimeError(f"round {server_round}: every client failed ({reasons})")
        before, self.state = self.state, self.strategy.aggregate(self.state, updates)
        log_.aggregation_error = aggregation_error(before, self.state, updates, self.strategy.weights(updates))
        w = np.asarray(weights, dtype=np.float64)
        log_.train_loss = float(np.average(losses, weights=w if w.sum() > 0 else None))
        return to_array_record(global_payload(self.state).arrays()), MetricRecord({"train_loss": log_.train_loss})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """With ``client_eval``, every client evaluates the model it would use on its own shard."""
        server_round += self.round_offset
        if not self.client_eval:
            return []
        messages = []
        for cid, node in sorted(self.node_ids.items()):
            payload = self.strategy.payload_for(self.state, str(cid))
            config = ConfigRecord({"server-round": server_round})
            messages.append(payload_message(payload, config, MessageType.EVALUATE, node))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        log_ = self.rounds.setdefault(server_round, RoundLog())
        accuracies, sizes = {}, {}
        for msg in replies:
            cid = self._client_of_node.get(msg.metadata.src_node_id, msg.metadata.src_node_id)
            if msg.has_error():
                log_.failed.append({"client": cid, "reason": f"evaluate: {msg.error.reason}"})
                continue
            metrics = msg.content[METRICS]
            accuracies[int(cid)] = float(metrics["accuracy"])
            sizes[int(cid)] = int(metrics["num-examples"])
        if not accuracies:
            return None
        log_.client_accuracy = dict(sorted(accuracies.items()))
        mean = float(np.average(list(accuracies.values()), weights=list(sizes.values())))
        return MetricRecord({"client_accuracy": mean})
