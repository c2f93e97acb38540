"""Several clients' train messages handled in one batched pass (``federation.engine = "batched"``).

Each message is decoded and answered by the same :class:`ClientHandlers`
steps as a message trained alone (``prepare_train`` and ``reply_train``:
the same seeds, DP redaction and upload); only the local steps in between
run for all of them at once, through
:func:`fedpeft.training.batched.train_clients_batched`. Under sample-level
DP each client keeps its own mechanism (its q from the server's DP plan),
its secret Poisson batches and noise generator, and its accountant.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from flwr.app import Context, Message

from fedpeft.client.app import ClientHandlers, client_mods
from fedpeft.config import Config, batch_sampling
from fedpeft.privacy.secret import secret_source
from fedpeft.training.batched import train_clients_batched


def batched_unsupported(conf: Config) -> str:
    """Why ``conf``'s clients cannot train batched ("" if they can); such messages train one by one.

    Every configuration trains batched now, sample-level DP-SGD included
    (per-example clipping and noise per client,
    :mod:`fedpeft.privacy.stacked_dp`); a batched pass that raises still
    falls back message by message (:class:`~fedpeft.server.batched_grid.BatchedGrid`).
    """
    return ""


def train_together(handlers: ClientHandlers, messages: Sequence[Message], contexts: Sequence[Context]) -> list[Message]:
    """Replies to train ``messages`` (one per client, with its node's ``contexts``), trained in one pass.

    The replies equal those of ``handlers.train`` on each message alone, to
    float rounding. All messages must share one config, so one resident
    model serves them.
    """
    jobs = [handlers.prepare_train(msg, ctx) for msg, ctx in zip(messages, contexts)]
    if not jobs:
        return []
    conf, rt = jobs[0].conf, jobs[0].rt
    if any(job.rt is not rt for job in jobs):
        raise ValueError("batched train messages must share one run config")
    t = conf.train
    split, _ = rt.splits
    private = conf.dp.mode == "sample"
    results = train_clients_batched(
        rt.model,
        split,
        [rt.shards[job.cid] for job in jobs],
        [job.seed for job in jobs],
        [job.payload for job in jobs],
        task=rt.model.task,
        steps=t.local_steps,
        batch_size=t.batch_size,
        lr=t.lr,
        weight_decay=t.weight_decay,
        sampling=batch_sampling(conf),
        optimizer=t.optimizer,
        momentum=t.momentum,
        dtype=conf.model.dtype,
        trainable=rt.strategy.trainable,
        dp=[job.dp for job in jobs] if private else None,
        secret=secret_source(conf.dp) if private else None,
    )
    mods = client_mods(conf.dp)
    return [through_mods(mods, msg, ctx, handlers.reply_train(msg, ctx, job, result.metrics, result.payload))
            for msg, ctx, job, result in zip(messages, contexts, jobs, results)]


def through_mods(mods: Sequence, msg: Message, ctx: Context, reply: Message) -> Message:
    """``reply`` as it leaves a ClientApp with ``mods`` (client-side clipping) after answering ``msg``.

    The batched pass made the reply without calling the app, so each mod wraps
    a ``call_next`` that returns it: Flower's clipping mods read the message
    before ``call_next`` and clip the reply after it, as they do in the app.
    """

    def call(m: Message, c: Context) -> Message:
        return reply

    for mod in reversed(mods):
        call = functools.partial(_apply_mod, mod, call)
    return call(msg, ctx)


def _apply_mod(mod, call_next, msg: Message, ctx: Context) -> Message:
    return mod(msg, ctx, call_next)
