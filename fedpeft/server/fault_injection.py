"""Seeded client failures and stragglers: ``federation.failure_rate`` and ``federation.straggler_rate``.

:class:`FaultInjectingGrid` wraps whichever Flower ``Grid`` the engine runs
(Ray's simulation grid, the in-process and batched grids, a deployment's
SuperLink), so every engine loses the same clients: a train message whose
client draws a failure is not delivered and comes back as an error reply
("crashed"), one whose client draws a straggler is not delivered and gets no
reply at all, as a client that answers after ``federation.round_timeout``
gets none from Flower. Neither client trains, which costs the simulation
nothing and changes nothing the server can see.

The draw is keyed on (round, attempt, client), so a resumed run loses the
same clients as one that never stopped. It follows the public seed, except
under client-level DP: there who was sampled is secret (the accountant's
amplification rests on it), and failures drawn from the public seed would
tell it, through the count of failures the metrics release. The draws then
come from the DP secret source, like the sampling itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import numpy as np
from flwr.app import Error, Message, MessageType
from flwr.serverapp import Grid

from fedpeft.compat.flwr_internals import set_message_id
from fedpeft.privacy.secret import SecretSource
from fedpeft.wire import ATTEMPT, CLIENT_ID, CONFIG, SERVER_ROUND

__all__ = ["FaultInjectingGrid", "client_fault", "INJECTED_FAILURE_CODE"]

INJECTED_FAILURE_CODE = 0
"""The error code of an injected crash: Flower's "the ClientApp raised an exception"."""


def client_fault(failure_rate: float, straggler_rate: float, server_round: int, attempt: int, client: int,
                 seed: int, secret: SecretSource | None = None) -> str | None:
    """What happens to ``client`` in try ``attempt`` of ``server_round``: ``"failure"``, ``"straggler"`` or None.

    One uniform draw per (round, attempt, client): below ``failure_rate`` the
    client crashes, below ``failure_rate + straggler_rate`` it straggles.
    From ``secret`` when given (client-level DP), else from ``seed``.
    """
    if failure_rate <= 0 and straggler_rate <= 0:
        return None
    if secret is not None:
        rng = secret.generator("client-faults", server_round, attempt, client)
    else:
        rng = np.random.default_rng([seed, 0xFA17, server_round, attempt, client])
    u = rng.random()
    if u < failure_rate:
        return "failure"
    if u < failure_rate + straggler_rate:
        return "straggler"
    return None


class FaultInjectingGrid(Grid):
    """``grid`` with seeded client failures and stragglers on its train messages.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The engine's grid; everything but the lost train messages goes through it.
    failure_rate, straggler_rate : float
        Chances that a sampled client crashes, or answers too late.
    seed : int
        The run's public seed (the draws' key without a secret).
    secret : SecretSource, optional
        Client-level DP: the draws come from it instead of ``seed``.
    """

    def __init__(self, grid: Grid, failure_rate: float, straggler_rate: float, seed: int,
                 secret: SecretSource | None = None):
        self.grid = grid
        self.failure_rate, self.straggler_rate = float(failure_rate), float(straggler_rate)
        self.seed, self.secret = int(seed), secret

    def fault_of(self, message: Message) -> str | None:
        if message.metadata.message_type != MessageType.TRAIN or not message.has_content():
            return None
        config = message.content.config_records.get(CONFIG)
        if config is None or CLIENT_ID not in config or SERVER_ROUND not in config:
            return None
        key = int(config[SERVER_ROUND]), int(config.get(ATTEMPT, 0)), int(config[CLIENT_ID])
        return client_fault(self.failure_rate, self.straggler_rate, *key, seed=self.seed, secret=self.secret)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        faults = [self.fault_of(m) for m in messages]
        delivered = [m for m, f in zip(messages, faults) if f is None]
        replies = list(self.grid.send_and_receive(delivered, timeout=timeout)) if delivered else []
        for message, fault in zip(messages, faults):
            if fault is None:
                continue
            # The strategy pairs replies with what it sent by message id, which the grid gives a message it sends.
            set_message_id(message, uuid.uuid4().hex)
            if fault == "failure":
                reason = "crashed (injected: federation.failure_rate)"
                replies.append(Message(Error(code=INJECTED_FAILURE_CODE, reason=reason), reply_to=message))
            # A straggler's reply would come after the timeout: Flower returns nothing for it.
        return replies

    # Everything else is the wrapped grid's.
    def set_run(self, run_id) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)
