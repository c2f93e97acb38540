"""Rounds that need a quorum: ``federation.min_clients`` good replies, else the round is run again.

:class:`RoundQuorum` wraps what Flower runs (fedpeft's strategy adapter, or
the client-level DP wrapper around it) and checks a round's replies before
anything aggregates them: with fewer than ``min_clients`` good replies the
try is recorded and voided (:meth:`FlowerLoRAStrategy.void_attempt`), a
fresh sample of clients is sent the same global model, and after
``federation.round_retries`` voided tries the run stops with one line. The
check comes before the DP wrapper on purpose: the wrapper clips and, with
adaptive clipping, moves its clipping norm from the replies it sees, and a
voided try must release nothing, the norm included.

Privacy of a try again. Under client-level DP a voided try releases
nothing but the fact that it was voided, decided from which clients
answered, not from what they sent (:meth:`FlowerLoRAStrategy.good_replies`);
the accountant's rounds are the rounds released, so the epsilon stands.
Under sample-level DP the clients of every try spend their own budget (each
reply says so, a lost one is counted as every step); with
``dp.target_epsilon`` the noise was calibrated to each client's planned
rounds, so a try again is refused there rather than overspend silently.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedpeft.errors import FederationError
from fedpeft.server.flower_strategy import FlowerLoRAStrategy

__all__ = ["RoundQuorum"]


class RoundQuorum(FlowerStrategy):
    """``outer`` with each round run again (fresh sample) while it gets fewer than ``flower.min_clients`` good replies.

    Parameters
    ----------
    outer : flwr.serverapp.strategy.Strategy
        What aggregates: ``flower`` itself or the DP wrapper around it.
    flower : FlowerLoRAStrategy
        fedpeft's adapter (inside ``outer``): it counts good replies and records voided tries.
    retries : int
        Voided tries of a round before the run stops.
    retry_refused : str, optional
        Why this run may not try a round again (sample-level DP at a target epsilon); None: it may.
    """

    def __init__(self, outer: FlowerStrategy, flower: FlowerLoRAStrategy, retries: int,
                 retry_refused: str | None = None):
        self.outer, self.flower, self.retries, self.retry_refused = outer, flower, int(retries), retry_refused
        self.timeout: float | None = None
        self._round: tuple[ArrayRecord, ConfigRecord, Grid] | None = None

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600, **kwargs):
        self.timeout = timeout
        return super().start(grid, initial_arrays, num_rounds, timeout, **kwargs)

    def summary(self) -> None:
        self.outer.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._round = (arrays, config, grid)
        return self.outer.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for tried in range(self.retries + 1):
            needed = self.flower.quorum(server_round)
            good = self.flower.good_replies(server_round, replies)
            if good >= needed:
                return self.outer.aggregate_train(server_round, replies)
            self.flower.void_attempt(server_round, replies, good)
            if tried == self.retries or self.retry_refused:
                break
            arrays, config, grid = self._round
            messages = self.outer.configure_train(server_round, arrays, config, grid)
            replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        raise FederationError(self._stop_line(server_round, good, needed, tried + 1))

    def _stop_line(self, server_round: int, good: int, needed: int, tries: int) -> str:
        absolute = server_round + self.flower.round_offset
        last = self.flower.rounds[absolute].retries[-1]["failed"]
        causes = "; ".join(f"client {f['client']}: {f['reason']}" if "client" in f else f["reason"] for f in last[:3])
        more = f" (and {len(last) - 3} more)" if len(last) > 3 else ""
        why = (f". A try again is refused: {self.retry_refused}" if self.retry_refused
               else f", in each of {tries} tries (federation.round_retries = {self.retries})")
        return (f"round {absolute}: {good} good repl{'y' if good == 1 else 'ies'} where federation.min_clients "
                f"needs {needed}{why}. Last try: {causes or 'no failures recorded'}{more}. The run folder keeps "
                f"round {absolute - 1}'s checkpoint (`fedpeft run --resume DIR` continues from it).")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.outer.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.outer.aggregate_evaluate(server_round, replies)
