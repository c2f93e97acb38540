"""Flower ``ClientApp`` (Message API) that trains a client's adapter on its shard.

A node is an executor, a client is data: each train and evaluate message
names the client it runs as (``wire.CLIENT_ID``), so a few nodes serve any
number of clients; a message without one runs as the node's own
``partition-id`` (``flwr run .`` with one SuperNode per client). Nothing
about a client stays on a node between messages (see :func:`client_accountant`).

Handlers:

* ``query``: loads this process's runtime (data, shards, model) before round
  1 and replies with the number of clients its config partitions the data into.
* ``train``: swaps the received adapter payload into the resident model,
  runs ``train.local_steps`` steps, replies with exactly the arrays the
  strategy uploads (only trainable tensors), ``num-examples`` and metrics.
* ``evaluate``: the received adapter's accuracy and loss on the client's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.client.byzantine import hostile_clients, hostile_upload
from fedpeft.config import Config, batch_sampling
from fedpeft.devices import client_device
from fedpeft.validation import config_from_run_config
from fedpeft.environment import quiet_environment
from fedpeft.privacy import Accountant, create_accountant
from fedpeft.privacy.client_level import client_clipping_mod
from fedpeft.privacy.dp_sgd import DPSGD
from fedpeft.privacy.secret import secret_source
from fedpeft.runtime import Runtime, runtime
from fedpeft.training import evaluate, train_steps
from fedpeft.wire import (
    ARRAYS,
    CLIENT_ID,
    CONFIG,
    DP_EPSILON,
    DP_NOISE_MULTIPLIER,
    DP_PRIOR_STEPS,
    DP_SAMPLE_RATE,
    DP_STEPS,
    METRICS,
    NUM_CLIENTS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SERVER_ROUND,
    STEPS,
    from_array_record,
    scalings_of,
    to_array_record,
)
from strategies import ClientUpdate, Payload

RELATION = "replace-one"
"""Sample-level DP's neighbouring relation: a client's shard size is public (weights, q)."""


def client_accountant(name: str, prior: tuple[float, float, int]) -> Accountant:
    """The client's accountant before this message's steps: ``prior`` rebuilt.

    ``prior`` is ``(sigma, q, steps)``: the plan's noise multiplier and this
    client's sample rate, both fixed for the run, and the DP-SGD steps the
    server has on record for the client (what the client reported, or every
    step it may have taken when its reply was lost; kept in the checkpoint).

    Rebuilt per message rather than kept on the node or on disk: an
    accountant stores only its history of ``(sigma, q, steps)`` segments, and
    with ``sigma`` and ``q`` fixed that history is one segment, so the steps
    on record determine it, and its epsilon, exactly. Any node can then run
    any client (a client trains on whichever node its round deals it to)
    with nothing to write, read or lose for 100,000 clients, and a resumed
    run or a fresh worker process needs no client files. The record is the
    server's, as the DP plan and the released epsilon already are; it
    protects nothing (the noise does), it only counts.
    """
    sigma, q, steps = prior
    accountant = create_accountant(name, relation=RELATION)
    return accountant.step(sigma, q, steps) if steps else accountant


def _dp_training(conf: Config, config):
    """The DP-SGD mechanism and accountant of this train message (None, None without sample DP).

    Sigma and q come from the server's DP plan in the message, never recomputed here.
    """
    if conf.dp.mode != "sample":
        return None, None
    if DP_SAMPLE_RATE not in config:
        raise ValueError(f"a train message under dp.mode = 'sample' must carry {DP_SAMPLE_RATE!r}, the DP plan's q "
                         f"for this client (fedpeft's server sends it with {DP_NOISE_MULTIPLIER!r})")
    sigma = float(config[DP_NOISE_MULTIPLIER])
    q = float(config[DP_SAMPLE_RATE])
    accountant = client_accountant(conf.dp.accountant, (sigma, q, int(config[DP_PRIOR_STEPS])))
    return DPSGD(sigma, conf.dp.max_grad_norm, q), accountant


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """One independent, reproducible seed per (run seed, round, client)."""
    return int(seed) * 1_000_003 + int(server_round) * 10_007 + int(client_id)


@dataclass
class TrainJob:
    """One decoded train message: whose it is, what it received, and how it must train."""

    conf: Config
    rt: Runtime
    cid: int
    received: dict  # the arrays as sent, by key
    payload: Payload
    seed: int
    dp: DPSGD | None
    accountant: Accountant | None


class ClientHandlers:
    """The ClientApp's message handlers for one config (or, without one, each message's run config).

    Each handler finds this process's resident runtime (data, shards, model,
    strategy), so a Flower worker builds the model once and only swaps adapter
    arrays per message.
    """

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg

    def setup(self, context: Context) -> tuple[Config, Runtime]:
        quiet_environment()
        conf = self.cfg if self.cfg is not None else config_from_run_config(context.run_config, role="client")
        fed = conf.federation
        return conf, runtime(conf, threads=fed.client_threads,
                             device=client_device(fed.device, fed.engine, fed.client_gpus))

    @staticmethod
    def client_of(msg: Message, context: Context, rt: Runtime) -> int:
        """The client ``msg`` runs as: the one it names, else the node's ``partition-id``."""
        config = msg.content.config_records.get(CONFIG)
        if config is not None and CLIENT_ID in config:
            cid = int(config[CLIENT_ID])
        elif PARTITION_ID in context.node_config:
            cid = int(context.node_config[PARTITION_ID])
        else:
            raise ValueError(f"the message names no client ({CLIENT_ID!r} in its config) and the node has no "
                             f"{PARTITION_ID!r} in its node config")
        if not 0 <= cid < len(rt.shards):
            raise ValueError(f"client {cid} is not in this federation of {len(rt.shards)} clients")
        return cid

    def query(self, msg: Message, context: Context) -> Message:
        """Build this process's runtime now (not in round 1); reply with the federation size it sees."""
        _, rt = self.setup(context)
        return Message(RecordDict({METRICS: MetricRecord({NUM_CLIENTS: len(rt.shards)})}), reply_to=msg)

    def train(self, msg: Message, context: Context) -> Message:
        """Local steps from the received adapter; replies with what the strategy uploads."""
        job = self.prepare_train(msg, context)
        rt, t = job.rt, job.conf.train
        rt.model.set_payload(job.payload, trainable=rt.strategy.trainable)
        split, _ = rt.splits
        metrics = train_steps(
            rt.model.model,
            split,
            rt.shards[job.cid],
            task=rt.model.task,
            steps=t.local_steps,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            seed=job.seed,
            sampling=batch_sampling(job.conf),
            dp=job.dp,
            secret=secret_source(job.conf.dp) if job.dp is not None else None,
            optimizer=t.optimizer,
            momentum=t.momentum,
            dtype=job.conf.model.dtype,
            rank_padding=rt.model.rank_padding(),
        )
        return self.reply_train(msg, context, job, metrics, rt.model.payload())

    def prepare_train(self, msg: Message, context: Context) -> TrainJob:
        """What a train message asks of this client, decoded; nothing is trained or loaded into the model yet."""
        conf, rt = self.setup(context)
        cid = self.client_of(msg, context, rt)
        if len(rt.shards[cid]) == 0:  # fedpeft's server never sends one; another server's message fails clearly
            raise ValueError(f"client {cid} holds no examples and cannot train")
        config = msg.content[CONFIG]
        received = from_array_record(msg.content[ARRAYS])
        dp, accountant = _dp_training(conf, config)
        return TrainJob(conf=conf, rt=rt, cid=cid, received=received,
                        payload=Payload.from_arrays(received, scalings_of(config)),
                        seed=client_seed(conf.federation.seed, int(config[SERVER_ROUND]), cid), dp=dp,
                        accountant=accountant)

    def reply_train(self, msg: Message, context: Context, job: TrainJob, metrics: dict[str, float],
                    local: Payload) -> Message:
        """The reply to a train message once ``job`` trained to ``local``: accounting, what DP lets out, the upload."""
        conf, rt, cid = job.conf, job.rt, job.cid
        dp, accountant = job.dp, job.accountant
        shard = rt.shards[cid]
        if accountant is not None:
            accountant.step(dp.noise_multiplier, dp.sample_rate, conf.train.local_steps)
        if conf.dp.mode != "none":
            # Only what the mechanism covers leaves the client: the loss and the Poisson
            # batch sizes are computed from its data without noise.
            metrics = {STEPS: metrics[STEPS]}
        if accountant is not None:
            metrics.update({DP_EPSILON: accountant.epsilon(conf.dp.delta), DP_STEPS: accountant.steps})
        fed = conf.federation
        if cid in hostile_clients(fed.num_clients, fed.byzantine_fraction, fed.seed):
            rng = np.random.default_rng([fed.seed, 0xB12, job.seed])
            local = hostile_upload(local, job.payload, fed.byzantine_attack, fed.byzantine_strength, rng)
        update = ClientUpdate(client_id=str(cid), factors=local.factors, num_examples=len(shard), extras=local.extras)
        if conf.dp.mode == "client":
            # Flower's clipping pairs the reply's arrays with the ones sent, key by key.
            mine = local.arrays()
            sent = {k: mine[k] for k in job.received}
        else:
            sent = rt.strategy.upload_arrays(update)
        metrics = {**metrics, NUM_EXAMPLES: len(shard), PARTITION_ID: cid}
        return Message(RecordDict({ARRAYS: to_array_record(sent), METRICS: MetricRecord(metrics)}), reply_to=msg)

    def evaluate(self, msg: Message, context: Context) -> Message:
        """The received adapter's accuracy and loss on the client's own shard."""
        conf, rt = self.setup(context)
        cid = self.client_of(msg, context, rt)
        payload = Payload.from_arrays(from_array_record(msg.content[ARRAYS]), scalings_of(msg.content[CONFIG]))
        rt.model.set_payload(payload)
        split, _ = rt.splits
        sub = split.subset(rt.shards[cid])
        result = evaluate(rt.model.model, sub, task=rt.model.task, batch_size=conf.train.eval_batch_size,
                          dtype=conf.model.dtype)
        reply = RecordDict({METRICS: MetricRecord({**result, NUM_EXAMPLES: len(sub), PARTITION_ID: cid})})
        return Message(reply, reply_to=msg)


def client_mods(dp) -> list:
    """The Flower client mods that ``dp`` puts around every reply (client-side clipping), outermost first."""
    return [m for m in (client_clipping_mod(dp),) if m]


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp for ``cfg``; without one, the config comes from the run config
    (``flwr run .``)."""
    mods = client_mods(cfg.dp) if cfg is not None else [_clipping_from_run_config]
    app = ClientApp(mods=mods)
    handlers = ClientHandlers(cfg)
    app.query()(handlers.query)
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app


def _clipping_from_run_config(msg: Message, context: Context, call_next):
    """Client-side DP clipping when the config comes from the run config (``flwr run .``)."""
    mod = client_clipping_mod(config_from_run_config(context.run_config, role="client").dp)
    return mod(msg, context, call_next) if mod else call_next(msg, context)


# ``flwr run .`` loads this object (pyproject [tool.flwr.app.components]).
app = make_client_app()
