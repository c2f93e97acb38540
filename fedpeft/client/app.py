"""Flower ``ClientApp`` (Message API) that trains a client's adapter on its shard.

Handlers:

* ``query``: replies with the node's partition id, so the server can map
  Flower's random node ids to fedpeft's client ids and sample reproducibly.
* ``train``: swaps the received adapter payload into the resident model,
  runs ``train.local_steps`` steps, replies with exactly the arrays the
  strategy uploads (only trainable tensors), ``num-examples`` and metrics.
* ``evaluate``: the received adapter's accuracy and loss on the client's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
    STEPS,
    from_array_record,
    scalings_of,
    to_array_record,
)
from strategies import ClientUpdate, Payload

ACCOUNTANT = "dp-accountant"
"""``Context.state`` key of a client's privacy accountant (sample-level DP)."""


RELATION = "replace-one"
"""Sample-level DP's neighbouring relation: a client's shard size is public (weights, q)."""


def client_accountant(context: Context, name: str, prior: tuple[float, float, int]) -> Accountant:
    """This client's accountant, kept in its Flower ``Context.state`` across rounds.

    ``prior`` is ``(sigma, q, steps)`` of the DP-SGD steps the server has on
    record for this client: a node that lost its state (a resumed run in a
    fresh process) restarts from that record instead of from zero.
    """
    saved = context.state.config_records.get(ACCOUNTANT)
    accountant = create_accountant(name, dict(saved) if saved is not None else None, relation=RELATION)
    sigma, q, steps = prior
    if accountant.steps < steps:
        accountant = create_accountant(name, relation=RELATION).step(sigma, q, steps)
    return accountant


def _dp_training(conf: Config, config, context: Context):
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
    accountant = client_accountant(context, conf.dp.accountant, (sigma, q, int(config[DP_PRIOR_STEPS])))
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

    def setup(self, context: Context) -> tuple[Config, Runtime, int]:
        quiet_environment()
        conf = self.cfg if self.cfg is not None else config_from_run_config(context.run_config)
        fed = conf.federation
        rt = runtime(conf, threads=fed.client_threads, device=client_device(fed.device, fed.engine, fed.client_gpus))
        return conf, rt, int(context.node_config[PARTITION_ID])

    def query(self, msg: Message, context: Context) -> Message:
        """The node's client id and shard size, so the server can map node ids to clients."""
        _, rt, cid = self.setup(context)
        return Message(RecordDict({METRICS: MetricRecord({PARTITION_ID: cid, NUM_EXAMPLES: len(rt.shards[cid])})}),
                       reply_to=msg)

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
        )
        return self.reply_train(msg, context, job, metrics, rt.model.payload())

    def prepare_train(self, msg: Message, context: Context) -> TrainJob:
        """What a train message asks of this client, decoded; nothing is trained or loaded into the model yet."""
        conf, rt, cid = self.setup(context)
        config = msg.content[CONFIG]
        received = from_array_record(msg.content[ARRAYS])
        dp, accountant = _dp_training(conf, config, context)
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
            context.state[ACCOUNTANT] = ConfigRecord(accountant.state_dict())
        if conf.dp.mode != "none":
            # Only what the mechanism covers leaves the client: the loss and the Poisson
            # batch sizes are computed from its data without noise.
            metrics = {STEPS: metrics[STEPS]}
        if accountant is not None:
            metrics.update({DP_EPSILON: accountant.epsilon(conf.dp.delta), DP_STEPS: accountant.steps})
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
        conf, rt, cid = self.setup(context)
        payload = Payload.from_arrays(from_array_record(msg.content[ARRAYS]), scalings_of(msg.content[CONFIG]))
        rt.model.set_payload(payload)
        split, _ = rt.splits
        sub = split.subset(rt.shards[cid])
        result = evaluate(rt.model.model, sub, task=rt.model.task, batch_size=conf.train.eval_batch_size,
                          dtype=conf.model.dtype)
        reply = RecordDict({METRICS: MetricRecord({**result, NUM_EXAMPLES: len(sub), PARTITION_ID: cid})})
        return Message(reply, reply_to=msg)


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp for ``cfg``; without one, the config comes from the run config
    (``flwr run .``)."""
    mods = [m for m in (client_clipping_mod(cfg.dp),) if m] if cfg is not None else [_clipping_from_run_config]
    app = ClientApp(mods=mods)
    handlers = ClientHandlers(cfg)
    app.query()(handlers.query)
    app.train()(handlers.train)
    app.evaluate()(handlers.evaluate)
    return app


def _clipping_from_run_config(msg: Message, context: Context, call_next):
    """Client-side DP clipping when the config comes from the run config (``flwr run .``)."""
    mod = client_clipping_mod(config_from_run_config(context.run_config).dp)
    return mod(msg, context, call_next) if mod else call_next(msg, context)


# ``flwr run .`` loads this object (pyproject [tool.flwr.app.components]).
app = make_client_app()
