"""A Flower ``Grid`` that delivers each message by calling the ClientApp directly.

It lets the unchanged ServerApp logic (``run_federation``) drive the unchanged
ClientApp handlers without Ray or a network: node ``k`` has its own
``Context`` with ``partition-id`` ``k - 1``, exactly as the simulation
runtime would give it, and runs whichever client a message names.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedpeft.compat.flwr_internals import set_message_id, set_server_task_identity

from fedpeft.wire import PARTITION_ID

# Flower's code for "the ClientApp raised an exception".
CLIENT_APP_RAISED_EXCEPTION = 0


class InProcessGrid(Grid):
    """Nodes ``1..num_nodes`` served by ``client_app`` in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int):
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=0,
                node_id=node,
                node_config={PARTITION_ID: node - 1, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node in range(1, num_nodes + 1)
        }
        self._run = None
        # Messages stamp their metadata from the process's task identity, which
        # Flower's runtimes set before a ServerApp starts; this grid is the runtime.
        set_server_task_identity()

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            # As Flower's grids do when they send a message: replies refer to it by this id.
            set_message_id(message, uuid.uuid4().hex)
            try:
                replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as exc:  # a failing client is a failed reply, as in Flower
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
                replies.append(Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message))
        return replies
