"""A Flower ``Strategy`` that runs any fedpeft (numpy) strategy.

The fedpeft strategy decides what each client is sent and how updates merge;
this adapter does the Flower side: seeded client sampling, one message per
client (payloads may differ per client), turning replies back into
``ClientUpdate`` objects, and counting the bytes of every array that crosses
the wire.

Clients are data, nodes are executors (virtual clients, as in pfl-research
and Flower's large simulations): each message names the client it runs as
(``wire.CLIENT_ID``) and the round's clients are dealt round-robin to a small
set of Flower nodes, so nothing here or in Flower grows with the federation
but the sampling itself. Everything a client keeps across rounds lives on the
server (the rule's per-client state, ``payload_for``) or in the message (the
DP-SGD steps on record), so any node can run any client. Because it is a plain ``flwr.serverapp.strategy.Strategy``, Flower's
own wrappers (differential privacy, robust aggregation) can wrap it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedpeft.errors import FederationError
from fedpeft.privacy.secret import OS_SECRET, SecretSource
from fedpeft.server.reply_checks import expected_upload, num_examples_problem, upload_problem
from fedpeft.sampling import sample_clients, secret_sample_clients
from fedpeft.wire import (
    ARRAYS,
    ATTEMPT,
    CLIENT_ID,
    CONFIG,
    DP_EPSILON,
    DP_NOISE_MULTIPLIER,
    DP_PRIOR_STEPS,
    DP_SAMPLE_RATE,
    DP_STEPS,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    from_array_record,
    nbytes,
    payload_config,
    to_array_record,
)
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
        {ARRAYS: to_array_record(payload.arrays()), CONFIG: payload_config(config, payload.scalings())}
    )
    return Message(content=content, message_type=message_type, dst_node_id=node_id)


@dataclass
class RoundLog:
    """What happened on the wire in one round."""

    clients: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    failed: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # sampled clients with no examples: not sent anything
    train_loss: float | None = None
    aggregation_error: float | None = None
    client_accuracy: dict[int, float] | None = None
    epsilon: dict[int, float] = field(default_factory=dict)  # sample-level DP: each trained client's epsilon so far
    # Seconds the clients spent in their step loops, summed; None under DP, where it stays on the client.
    compute_s: float | None = None
    # Tries of this round voided for too few answers (federation.min_clients): what each sent and what came back.
    retries: list[dict] = field(default_factory=list)


class FlowerLoRAStrategy(FlowerStrategy):
    """Runs a fedpeft strategy inside Flower's ``Strategy.start`` loop.

    Parameters
    ----------
    strategy : strategies.Strategy
        The aggregation rule.
    state : strategies.ServerState
        Its initial state.
    nodes : sequence of int, or mapping of int to int
        The Flower node ids that run the clients: each round's clients are
        dealt to them round-robin (in the order of the sorted node ids). A
        mapping pins each fedpeft client id to one node instead.
    clients_per_round : int
        Clients sampled each round.
    seed : int
        Seed of the client sampling.
    client_eval : bool
        Also evaluate on clients' own shards after each round.
    client_eval_clients : int
        With ``client_eval``: how many clients evaluate, a fixed seeded
        sample (:func:`evaluated_clients`); 0 = every client with examples.
    round_offset : int
        Rounds already done before this start (a resumed run): Flower counts
        from 1 again, fedpeft's rounds, seeds and logs stay absolute.
    dp_plan : fedpeft.privacy.DPPlan, optional
        Sample level: clients get the noise multiplier and the DP-SGD steps
        they already took (their accountant survives a resume that way);
        their epsilons come back in the replies. Client level: this adapter
        runs inside a Flower DP wrapper, so it weights clients equally and
        adopts the noised arrays the wrapper releases as the new state.
    dp_steps, dp_epsilon : dict, optional
        DP-SGD steps and epsilon of each client before this start (a resumed run).
    secret : fedpeft.privacy.secret.SecretSource, optional
        Client level: the secret source of the client sampling, whose
        amplification the accountant claims (the OS CSPRNG when None).
    num_clients : int, optional
        Clients in the federation (default: as many as ``nodes``).
    max_update_norm : float
        A reply whose update (upload minus what the client was sent) is
        longer than this is rejected (0 = no bound); every reply is checked
        by :mod:`fedpeft.server.reply_checks` before the rule sees it.
    shard_sizes : sequence of int, optional
        Each client's examples (public: the aggregation weights and DP
        sample rates already reveal them). A sampled client with none is
        sent nothing and noted in the round's ``skipped`` list.
    min_clients : int
        Good replies a round needs (:meth:`good_replies`); a round with fewer
        is voided (:meth:`void_attempt`) and run again by
        :class:`fedpeft.server.round_quorum.RoundQuorum`.
    round_timeout : float
        The server's wait for replies (0 = Flower's default), named in the
        reason of a client that did not answer.

    Notes
    -----
    Under client-level DP nothing computed from an individual upload is
    kept for release: no train loss, no aggregation error, no client ids
    (who was sampled is secret), no line for a reply rejected for what it
    holds (the reason, even its existence, is a function of the client's
    data that no noise covers; the reply counts as a zero update). A sampled client whose reply is missing or
    rejected counts as a zero update, so the mean stays the sum of ``m``
    clipped updates over ``m``, the sensitivity the noise is scaled for.
    Under sample-level DP every sampled client's spend is recorded, from
    its reply or, when the reply is lost, as the full ``local_steps`` it
    may have taken.
    """

    def __init__(self, strategy: LoRAStrategy, state: ServerState, nodes: Sequence[int] | Mapping[int, int],
                 clients_per_round: int, seed: int, client_eval: bool = False, round_offset: int = 0, dp_plan=None,
                 dp_steps: dict[int, int] | None = None, dp_epsilon: dict[int, float] | None = None,
                 secret: SecretSource | None = None, *, num_clients: int | None = None,
                 shard_sizes: Sequence[int] | None = None, client_eval_clients: int = 0, max_update_norm: float = 0.0,
                 min_clients: int = 1, round_timeout: float = 0.0):
        self.dp_plan = dp_plan
        self.secret = secret or OS_SECRET
        self.dp_steps = {int(c): int(s) for c, s in (dp_steps or {}).items()}
        self.dp_epsilon = {int(c): float(e) for c, e in (dp_epsilon or {}).items()}
        self.client_dp = dp_plan is not None and dp_plan.unit == "client"
        self.client_eval = client_eval
        self.round_offset = round_offset
        self.strategy = strategy
        self.state = state
        self.nodes = dict(nodes) if isinstance(nodes, Mapping) else sorted(int(n) for n in nodes)
        if not self.nodes:
            raise ValueError("FlowerLoRAStrategy needs at least one node to run the clients on")
        self.num_clients = int(num_clients if num_clients is not None else len(self.nodes))
        self.empty = frozenset(int(c) for c in np.flatnonzero(np.asarray(shard_sizes) == 0)) if shard_sizes is not None \
            else frozenset()
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.client_eval_clients = client_eval_clients
        self.max_update_norm = float(max_update_norm)
        self.min_clients = int(min_clients)
        self.round_timeout = float(round_timeout)
        self.rounds: dict[int, RoundLog] = {}
        self._attempt: dict[int, int] = {}  # round -> the try being run (rounds voided for too few answers)
        self._checked: dict[int, tuple[Message, tuple]] = {}  # id(reply) -> (reply, _read_reply's result), for one use
        self._pinned_client_of_node = {n: c for c, n in self.nodes.items()} if isinstance(self.nodes, dict) else None
        self._sent: dict[tuple[str, int], list[tuple[Message, int]]] = {}  # (phase, round) -> (message, client)
        self._sent_steps: dict[tuple[int, int], int] = {}  # (round, client) -> DP-SGD steps on record when sent
        self._screened: dict[int, set[int]] = {}  # round -> clients screen_replies already recorded as failed
        self._screened_ids: dict[int, dict[str, int]] = {}  # round -> the sent-message map screen_replies read

    def summary(self) -> None:
        log(INFO, "\t├──> fedpeft strategy: %s", self.strategy.describe())
        log(INFO, "\t└──> clients per round: %d of %d, on %d nodes", self.clients_per_round, self.num_clients,
            len(self.nodes))

    def adopt(self, arrays: ArrayRecord) -> None:
        """Client-level DP: take the released (noised) global arrays as the state.

        Flower's DP wrapper adds its noise to the arrays :meth:`aggregate_train`
        returns; the model clients train from and the server evaluates must be
        that noised release, not the clean aggregate, or the noise protects
        nothing.
        """
        if not self.client_dp:
            return
        released = Payload.from_arrays(from_array_record(arrays), global_payload(self.state).scalings())
        self.state = replace(self.state, factors=released.factors, extras=released.extras)

    def uploaded(self, arrays: dict) -> dict:
        """The arrays of a reply the strategy takes: under client-level DP clients
        echo every key they were sent (Flower's clipping pairs them by position)."""
        if not self.client_dp:
            return arrays
        keys = self.private_keys()
        return {k: v for k, v in arrays.items() if k in keys}

    def private_keys(self) -> set[str]:
        """Keys of the global arrays that clients train and upload."""
        parts = tuple(f"lora_{p}/" for p in self.strategy.upload_parts)
        extras = ("extra/",) if self.strategy.upload_extras else ()
        return {k for k in global_payload(self.state).arrays() if k.startswith(parts + extras)}

    def sample(self, server_round: int, attempt: int = 0) -> list[int]:
        """The clients of try ``attempt`` of ``server_round``: seeded and public, or secret under client-level DP."""
        n, m = self.num_clients, self.clients_per_round
        if self.client_dp:
            return secret_sample_clients(n, m, self.secret, server_round, attempt)
        return sample_clients(n, m, self.seed, server_round, attempt)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.adopt(arrays)
        attempt = self._attempt.get(server_round, 0)
        clients = self.sample(server_round, attempt)
        if attempt == 0:
            log_ = self.rounds[server_round] = RoundLog(clients=clients)
        else:  # a try again: the voided tries stay in the log (and their bytes in its totals)
            log_ = self.rounds[server_round]
            log_.clients = clients
        log_.skipped = [self._note(cid, "no examples") for cid in clients if cid in self.empty]
        training = [cid for cid in clients if cid not in self.empty]
        sent = self._sent[("train", server_round)] = []
        for cid, node in zip(training, self.placement(training)):
            payload = self.strategy.payload_for(self.state, str(cid))
            log_.bytes_down += payload.nbytes
            train_config = ConfigRecord({**dict(config), SERVER_ROUND: server_round, CLIENT_ID: cid, ATTEMPT: attempt})
            if self.dp_plan is not None and self.dp_plan.unit == "sample":
                train_config[DP_NOISE_MULTIPLIER] = float(self.dp_plan.noise_multiplier)
                train_config[DP_SAMPLE_RATE] = float(self.dp_plan.sample_rates[cid])
                train_config[DP_PRIOR_STEPS] = self._sent_steps[(server_round, cid)] = self.dp_steps.get(cid, 0)
            sent.append((payload_message(payload, train_config, MessageType.TRAIN, node), cid))
        return [message for message, _ in sent]

    def placement(self, clients: Sequence[int]) -> list[int]:
        """The node each of ``clients`` runs on: its pinned node, or dealt round-robin over the nodes."""
        if isinstance(self.nodes, dict):
            return [self.nodes[c] for c in clients]
        return [self.nodes[i % len(self.nodes)] for i in range(len(clients))]

    def _sent_clients(self, phase: str, server_round: int) -> dict[str, int]:
        """Message id -> client of the messages sent for ``phase`` of ``server_round`` (forgotten after).

        The grid gives each message its id as it sends it, so the ids are read back here, after sending.
        """
        sent = self._sent.pop((phase, server_round), [])
        return {m.metadata.message_id: c for m, c in sent if m.metadata.message_id}

    def _client_of(self, reply: Message, by_id: dict[str, int]) -> int | None:
        """The fedpeft client a reply answers for: by the message it replies to, else by what it says (None if neither)."""
        cid = by_id.get(reply.metadata.reply_to_message_id)
        if cid is not None:
            return cid
        if reply.has_content() and METRICS in reply.content and PARTITION_ID in reply.content[METRICS]:
            return int(reply.content[METRICS][PARTITION_ID])
        if self._pinned_client_of_node is not None:
            return self._pinned_client_of_node.get(reply.metadata.src_node_id)
        return None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        log_ = self.rounds.setdefault(server_round, RoundLog())
        updates, losses, weights = self._collect(server_round, replies)
        if not updates and not log_.failed and not self.client_dp:
            # Every sampled client was skipped (no examples): the round leaves the model as it was.
            # (Client-level DP still releases the noised mean of zero updates: who is empty stays unsaid.)
            return to_array_record(global_payload(self.state).arrays()), MetricRecord({})
        if not updates and log_.failed:
            reasons = "; ".join(f"client {f.get('client', '?')}: {f['reason']}" for f in log_.failed) or "no replies"
            raise FederationError(f"round {server_round}: every client failed ({reasons})")
        if self.client_dp:
            updates += self._zero_updates(self.clients_per_round - len(updates))
        before, self.state = self.state, self.strategy.aggregate(self.state, updates)
        if self.client_dp:
            # The clean aggregate's distance from the exact mean, or any client's loss, is computed
            # from individual uploads without noise: none of it may be released.
            return to_array_record(global_payload(self.state).arrays()), MetricRecord({})
        log_.aggregation_error = aggregation_error(before, self.state, updates, self.strategy.weights(updates))
        w = np.asarray(weights, dtype=np.float64)
        known = np.isfinite(losses)  # DP clients keep their loss to themselves
        if known.any():
            kw = w[known]
            log_.train_loss = float(np.average(np.asarray(losses)[known], weights=kw if kw.sum() > 0 else None))
        metrics = MetricRecord({"train_loss": log_.train_loss} if log_.train_loss is not None else {})
        return to_array_record(global_payload(self.state).arrays()), metrics

    def _collect(self, server_round: int, replies: Iterable[Message]) -> tuple[list, list[float], list[int]]:
        """The round's usable updates, their losses and weights; every failure and DP spend recorded on the way."""
        log_ = self.rounds.setdefault(server_round, RoundLog())
        updates, losses, weights, answered, lost = [], [], [], self._screened.pop(server_round, set()), set()
        by_id = self._screened_ids.pop(server_round, None) or self._sent_clients("train", server_round)
        for msg in replies:
            cid = self._client_of(msg, by_id)
            if msg.has_error():
                log_.failed.append(self._failure(cid, msg.error.reason, msg.metadata.src_node_id))
                if cid is not None:
                    answered.add(cid)
                    lost.add(cid)
                continue
            if cid is None:
                log_.failed.append(self._failure(None, "rejected: the reply names no client", msg.metadata.src_node_id))
                continue
            answered.add(cid)
            arrays, metrics, problem = self._read_reply(msg, cid)
            if problem is not None:  # never aggregated; its DP spend (if it says one) is on record all the same
                self._reject(log_, cid, problem)
                continue
            # Client-level DP calibrates its noise to a uniform mean: every client counts once.
            n = 1 if self.client_dp else int(metrics[NUM_EXAMPLES])
            try:
                update = self.strategy.receive(self.state, str(cid), arrays, n, metrics=metrics)
            except ValueError as exc:  # what the checks let through but the rule cannot take
                self._reject(log_, cid, str(exc))
                continue
            log_.bytes_up += nbytes(arrays)
            if DP_EPSILON in metrics:
                log_.epsilon[int(cid)] = self.dp_epsilon[int(cid)]
            updates.append(update)
            losses.append(float(metrics.get("train_loss", np.nan)))
            weights.append(n)
            if "compute_s" in metrics:
                log_.compute_s = (log_.compute_s or 0.0) + float(metrics["compute_s"])
        for cid in sorted(set(log_.clients) - self.empty - answered):  # sent, but no reply at all
            log_.failed.append(self._failure(cid, self._no_reply()))
            lost.add(cid)
        self._record_lost_spend(server_round, lost)
        self._checked.clear()
        return updates, losses, weights

    def _no_reply(self) -> str:
        if self.round_timeout > 0:
            return f"no reply within federation.round_timeout = {self.round_timeout:g} s"
        return "no reply"

    def _reject(self, log_: RoundLog, cid, problem: str) -> None:
        """A reply that arrived but may not be aggregated. Under client-level DP its line is left out: why a
        client's update was rejected (its norm, its NaNs) is computed from its data, and no noise covers it."""
        if not self.client_dp:
            log_.failed.append(self._failure(cid, f"rejected: {problem}"))

    def quorum(self, server_round: int) -> int:
        """Good replies try ``server_round`` needs: ``min_clients``, or every client sent a message when fewer were
        (sampled clients without examples are sent nothing, and another sample would not change what they hold)."""
        return min(self.min_clients, len(self._sent.get(("train", server_round + self.round_offset), [])))

    def good_replies(self, server_round: int, replies: Sequence[Message]) -> int:
        """How many of ``replies`` count towards the round's ``min_clients``.

        Replies that arrived without an error and pass every check; under
        client-level DP every reply that arrived (whether an update passes a
        check depends on the client's data, and the decision to run a round
        again is released). Checked replies are not checked again when
        :meth:`aggregate_train` takes them.
        """
        arrived = [m for m in replies if not m.has_error()]
        if self.client_dp or len(arrived) < self.min_clients:
            return len(arrived)
        by_id = {m.metadata.message_id: c for m, c in self._sent.get(("train", server_round + self.round_offset), [])}
        good = 0
        for msg in arrived:
            cid = self._client_of(msg, by_id)
            if cid is None:
                continue
            result = self._read_reply(msg, cid)
            self._checked[id(msg)] = (msg, result)
            good += result[2] is None
        return good

    def void_attempt(self, server_round: int, replies: Sequence[Message], good: int) -> None:
        """Record a try of ``server_round`` that got only ``good`` good replies; the next configure_train tries again.

        Its failures and DP spend are recorded as in a round that counts;
        nothing it sent back is aggregated.
        """
        absolute = server_round + self.round_offset
        log_ = self.rounds.setdefault(absolute, RoundLog())
        attempt = self._attempt.get(absolute, 0)
        self._collect(absolute, replies)
        log_.retries.append({"attempt": attempt, "clients": None if self.client_dp else list(log_.clients),
                             "good_replies": good, "failed": log_.failed})
        log_.failed = []
        self._attempt[absolute] = attempt + 1

    def _note(self, cid, reason: str) -> dict:
        """A client's line in the metrics; under client-level DP without its id (sampling is secret)."""
        return {"reason": reason} if self.client_dp else {"client": cid, "reason": reason}

    def screen_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Client level: the replies Flower's DP wrapper may clip; the others are recorded as failed here.

        The wrapper clips every reply against the global arrays before this
        adapter sees any (a reply of other shapes would crash it), and skips
        the round's aggregation when any reply is an error. So the wrapper
        calls this first: what it drops counts as a zero update, as a lost
        client does, and the mean keeps the sensitivity the noise is for.
        """
        server_round += self.round_offset
        log_ = self.rounds.setdefault(server_round, RoundLog())
        by_id = self._screened_ids[server_round] = self._sent_clients("train", server_round)
        kept = []
        for msg in replies:
            cid = self._client_of(msg, by_id)
            if msg.has_error():
                reason = msg.error.reason
            elif cid is None:
                reason = "rejected: the reply names no client"
            else:
                problem = self._read_reply(msg, cid)[2]
                reason = None if problem is None else f"rejected: {problem}"
            if reason is None:
                kept.append(msg)
                continue
            if not msg.has_error() and cid is not None:  # rejected for what it holds: see _reject
                self._screened.setdefault(server_round, set()).add(cid)
                continue
            log_.failed.append(self._failure(cid, reason, msg.metadata.src_node_id))
            if cid is not None:
                self._screened.setdefault(server_round, set()).add(cid)
        return kept

    def _read_reply(self, msg: Message, cid: int) -> tuple[dict, dict, str | None]:
        """A train reply's uploaded arrays and metrics, and why they must be rejected (None: they may be aggregated).

        See :mod:`fedpeft.server.reply_checks`. Nothing a client sends can
        make this raise.
        """
        checked = self._checked.pop(id(msg), None)
        if checked is not None and checked[0] is msg:
            return checked[1]
        try:
            metrics = dict(msg.content[METRICS])
        except (KeyError, TypeError) as exc:
            return {}, {}, f"no metrics record ({exc})"
        try:
            self._record_spend(cid, metrics)
        except (TypeError, ValueError) as exc:
            return {}, metrics, f"unreadable DP spend ({exc})"
        problem = num_examples_problem(metrics.get(NUM_EXAMPLES))
        if problem is not None:
            return {}, metrics, problem
        try:
            arrays = self.uploaded(from_array_record(msg.content[ARRAYS]))
        except Exception as exc:  # a record that does not decode, whatever the decoder raises
            return {}, metrics, f"arrays that do not decode ({type(exc).__name__}: {exc})"
        expected = expected_upload(self.strategy, self.state, str(cid))
        return arrays, metrics, upload_problem(arrays, expected, self.max_update_norm)

    def _failure(self, cid, reason: str, node: int | None = None) -> dict:
        """A failed client's line; a reply that names no client is told by its node."""
        if cid is None and not self.client_dp:
            return {"node": node, "reason": reason}
        return self._note(cid, reason)

    def _record_spend(self, cid, metrics: dict) -> None:
        """Sample level: the client's own account of its steps, rejected replies included."""
        if DP_STEPS in metrics:
            self.dp_steps[int(cid)] = int(metrics[DP_STEPS])
            self.dp_epsilon[int(cid)] = float(metrics[DP_EPSILON])

    def _record_lost_spend(self, server_round: int, lost: set) -> None:
        """Sample level: a client whose reply was lost may still have taken every step; count them."""
        if self.dp_plan is None or self.dp_plan.unit != "sample":
            return
        for cid in lost:
            steps = self._sent_steps.get((server_round, int(cid)), 0) + self.dp_plan.local_steps
            if steps > self.dp_steps.get(int(cid), 0):
                self.dp_steps[int(cid)] = steps
                self.dp_epsilon[int(cid)] = self.dp_plan.epsilon_after(int(cid), steps)

    def _zero_updates(self, count: int) -> list:
        """Client level: ``count`` updates equal to the global arrays (a missing client adds nothing)."""
        arrays = self.uploaded(global_payload(self.state).arrays())
        return [self.strategy.receive(self.state, f"absent-{i}", arrays, 1) for i in range(count)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """With ``client_eval``, every client evaluates the model it would use on its own shard."""
        server_round += self.round_offset
        self.adopt(arrays)
        if not self.client_eval:
            return []
        clients = evaluated_clients(self.num_clients, self.empty, self.client_eval_clients, self.seed)
        sent = self._sent[("evaluate", server_round)] = []
        for cid, node in zip(clients, self.placement(clients)):
            payload = self.strategy.payload_for(self.state, str(cid))
            config = ConfigRecord({SERVER_ROUND: server_round, CLIENT_ID: cid})
            sent.append((payload_message(payload, config, MessageType.EVALUATE, node), cid))
        return [message for message, _ in sent]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        log_ = self.rounds.setdefault(server_round, RoundLog())
        accuracies, sizes = {}, {}
        by_id = self._sent_clients("evaluate", server_round)
        for msg in replies:
            cid = self._client_of(msg, by_id)
            if msg.has_error():
                log_.failed.append(self._failure(cid, f"evaluate: {msg.error.reason}", msg.metadata.src_node_id))
                continue
            metrics = msg.content[METRICS]
            accuracies[int(cid)] = float(metrics["accuracy"])
            sizes[int(cid)] = int(metrics[NUM_EXAMPLES])
        if not accuracies:
            return None
        log_.client_accuracy = dict(sorted(accuracies.items()))
        mean = float(np.average(list(accuracies.values()), weights=list(sizes.values())))
        return MetricRecord({"client_accuracy": mean})


def evaluated_clients(num_clients: int, empty: frozenset[int], cap: int, seed: int) -> list[int]:
    """The clients that evaluate on their own shard each round, in id order.

    Every client with examples, or, when there are more than ``cap > 0`` of
    them, a sample of ``cap`` drawn once from ``seed`` (a stream of its own,
    apart from the training sample): the same clients every round, so their
    accuracy curve compares round to round, and one message per sampled
    client instead of one per client of a 100,000-client federation.
    """
    candidates = np.setdiff1d(np.arange(num_clients), np.fromiter(empty, dtype=np.int64, count=len(empty)))
    if 0 < cap < len(candidates):
        rng = np.random.default_rng([seed, 0xE7A1])
        candidates = np.sort(rng.choice(candidates, size=cap, replace=False))
    return [int(c) for c in candidates]
