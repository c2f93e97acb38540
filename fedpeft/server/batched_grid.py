"""A Flower ``Grid`` that trains a round's sampled clients together (``federation.engine = "batched"``).

The server loop is unchanged: the strategy sends a round's train messages in
one ``send_and_receive`` call, and this grid runs them in chunks of
``federation.batch_clients`` through one batched forward and backward pass
over the resident model (:func:`fedpeft.client.batched.train_together`).

Everything else goes through the ClientApp one message at a time, exactly
as :class:`InProcessGrid` delivers it: queries, evaluations, train messages
of any configuration :func:`fedpeft.client.batched.batched_unsupported`
names (none at present: sample-level DP-SGD trains batched too), and the
messages of a batched pass that raised, so that one client's failure stays
its own.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Message, MessageType
from flwr.clientapp import ClientApp

from fedpeft.client.app import ClientHandlers
from fedpeft.client.batched import batched_unsupported, train_together
from fedpeft.compat.flwr_internals import set_message_id
from fedpeft.config import Config
from fedpeft.server.inprocess_grid import InProcessGrid

log = logging.getLogger(__name__)


class BatchedGrid(InProcessGrid):
    """Nodes ``1..federation.num_nodes`` in this process; train messages of a round train together.

    Parameters
    ----------
    client_app : ClientApp
        Serves every message the batched path does not.
    cfg : Config
        The run's config: ``federation.batch_clients`` sizes the chunks.
    """

    def __init__(self, client_app: ClientApp, cfg: Config):
        super().__init__(client_app, cfg.num_nodes)
        self.handlers = ClientHandlers(cfg)
        self.chunk = cfg.federation.batch_clients
        self.fallback_reason = batched_unsupported(cfg)
        if self.fallback_reason:
            log.warning("federation.engine = 'batched' trains this run's clients one by one: %s", self.fallback_reason)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        together = [] if self.fallback_reason else [m for m in messages if m.metadata.message_type == MessageType.TRAIN]
        alone = [m for m in messages if not any(m is t for t in together)]
        replies = dict(zip(map(id, alone), super().send_and_receive(alone, timeout=timeout)))
        for msg in together:  # as InProcessGrid does for the rest: replies refer to their message by this id
            set_message_id(msg, uuid.uuid4().hex)
        size = self.chunk or len(together) or 1
        for start in range(0, len(together), size):
            chunk = together[start : start + size]
            for msg, reply in zip(chunk, self._train_chunk(chunk)):
                replies[id(msg)] = reply
        return [replies[id(m)] for m in messages]

    def _train_chunk(self, chunk: list[Message]) -> list[Message]:
        contexts = [self.contexts[m.metadata.dst_node_id] for m in chunk]
        try:
            return train_together(self.handlers, chunk, contexts)
        except Exception:
            # One client's bad message must not fail the others: rerun the chunk one
            # message at a time, so only the failing client's reply is an error.
            log.warning("a batched pass failed; its %d train messages run one by one:\n%s", len(chunk),
                        traceback.format_exc(limit=3))
            return list(super().send_and_receive(chunk))
