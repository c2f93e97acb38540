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

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.config import Config, config_from_run_config
from fedpeft.engine import quiet_environment
from fedpeft.runtime import runtime
from fedpeft.training import evaluate, train_steps
from fedpeft.wire import ARRAYS, CONFIG, METRICS, SCALINGS, from_array_record, to_array_record
from strategies import ClientUpdate, Payload


def client_seed(seed: int, server_round: int, client_id: int) -> int:
    """One independent, reproducible seed per (run seed, round, client)."""
    return int(seed) * 1_000_003 + int(server_round) * 10_007 + int(client_id)


def make_client_app(cfg: Config | None = None) -> ClientApp:
    """A ClientApp for ``cfg``; without one, the config comes from the run config
    (``flwr run .``)."""
    app = ClientApp()

    def setup(context: Context):
        quiet_environment()
        conf = cfg if cfg is not None else config_from_run_config(context.run_config)
        rt = runtime(conf, threads=conf.federation.client_threads)
        return conf, rt, int(context.node_config["partition-id"])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        _, rt, cid = setup(context)
        return Message(RecordDict({METRICS: MetricRecord({"partition-id": cid, "num-examples": len(rt.shards[cid])})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        conf, rt, cid = setup(context)
        server_round = int(msg.content[CONFIG]["server-round"])
        payload = Payload.from_arrays(from_array_record(msg.content[ARRAYS]), dict(msg.content[SCALINGS]))
        rt.model.set_payload(payload, trainable=rt.strategy.trainable)
        split, _ = rt.splits
        shard = rt.shards[cid]
        t = conf.train
        metrics = train_steps(
            rt.model.model,
            split,
            shard,
            task=rt.model.task,
            steps=t.local_steps,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            seed=client_seed(conf.federation.seed, server_round, cid),
        )
        local = rt.model.payload()
        update = ClientUpdate(client_id=str(cid), factors=local.factors, num_examples=len(shard), extras=local.extras)
        sent = rt.strategy.upload_arrays(update)
        reply = RecordDict(
            {
                ARRAYS: to_array_record(sent),
                METRICS: MetricRecord({**metrics, "num-examples": len(shard), "partition-id": cid}),
            }
        )
        return Message(reply, reply_to=msg)

    @app.evaluate()
    def evaluate_local(msg: Message, context: Context) -> Message:
        conf, rt, cid = setup(context)
        payload = Payload.from_arrays(from_array_record(msg.content[ARRAYS]), dict(msg.content[SCALINGS]))
        rt.model.set_payload(payload)
        split, _ = rt.splits
        sub = split.subset(rt.shards[cid])
        result = evaluate(rt.model.model, sub, task=rt.model.task, batch_size=conf.train.eval_batch_size)
        reply = RecordDict({METRICS: MetricRecord({**result, "num-examples": len(sub), "partition-id": cid})})
        return Message(reply, reply_to=msg)

    return app


# ``flwr run .`` loads this object (pyproject [tool.flwr.app.components]).
app = make_client_app()
