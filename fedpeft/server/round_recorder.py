"""What the server records after each round: the metrics line, the checkpoint, the progress callback.

Flower's strategies call an ``evaluate_fn(server_round, arrays)`` after every
aggregation (and once before round 1); :class:`RoundRecorder` is that
function for a fedpeft run. Central evaluation stalls every client while the
server runs it, so ``federation.eval_every`` and ``federation.eval_examples``
thin it out between the first and the last round, which are always evaluated
on the whole test set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedpeft.runtime import Runtime
from fedpeft.server.flower_strategy import FlowerLoRAStrategy, global_payload
from fedpeft.server.privacy_log import dp_checkpoint, round_privacy
from fedpeft.server.run_folder import RunFolder
from fedpeft.training import evaluate


def test_set_size(rt: Runtime) -> int:
    """Examples in the configured test set (the test split, capped by ``data.max_test_examples``)."""
    n = len(rt.splits[1])
    cap = rt.cfg.data.max_test_examples
    return n if cap <= 0 else min(cap, n)


def eval_subset(size: int, n: int, seed: int) -> np.ndarray | None:
    """The fixed test subset of ``size`` of the ``n`` test examples evaluated between rounds (None: all of them).

    Drawn once from the public run seed: the test set is public, and the same
    subset every round keeps the rounds' accuracies comparable.
    """
    if size <= 0 or size >= n:
        return None
    return np.sort(np.random.default_rng([seed, 0xE7A1]).choice(n, size=size, replace=False))


def evaluated_rounds(num_rounds: int, every: int) -> set[int]:
    """Rounds the server evaluates: round 0, every ``every``-th round and the last one."""
    return {0, num_rounds, *range(every, num_rounds + 1, every)}


def evaluate_global(rt: Runtime, state, subset: np.ndarray | None = None) -> dict[str, float]:
    """The global adapter's accuracy and loss on the test set (or on the test examples ``subset``)."""
    rt.model.set_payload(global_payload(state))
    _, test = rt.splits
    limit = rt.cfg.data.max_test_examples
    if subset is not None:
        test, limit = test.subset(subset), 0
    return evaluate(rt.model.model, test, task=rt.model.task, batch_size=rt.cfg.train.eval_batch_size, limit=limit,
                    dtype=rt.cfg.model.dtype)


def _not_evaluated(task: str) -> dict[str, None]:
    """The evaluation fields of a round the server did not evaluate."""
    keys = ("accuracy", "loss", "perplexity") if task == "causal_lm" else ("accuracy", "loss")
    return dict.fromkeys(keys)


def _client_accuracy(log_) -> dict[str, Any]:
    """Each client's accuracy on its own shard (``federation.client_eval``)."""
    per_client = (log_.client_accuracy or {}) if log_ else {}
    return {"client_accuracy": {str(c): a for c, a in per_client.items()}}


class RoundRecorder:
    """Evaluates the global adapter after each round and records the round.

    Parameters
    ----------
    rt : Runtime
        The server's runtime (its resident model evaluates).
    flower : FlowerLoRAStrategy
        The strategy adapter: its state and per-round logs.
    outer : flwr strategy
        What Flower runs (``flower`` or its client-level DP wrapper), whose DP
        state goes into the checkpoint.
    folder : RunFolder
        Where ``metrics.jsonl`` and the checkpoint go.
    plan : DPPlan or None
        The run's DP plan (None without DP).
    progress : dict
        The checkpoint's progress record (rounds done, byte totals, wall time) at the start.
    history : list of dict
        The metrics lines so far (appended to).
    resume : bool
        Whether the run continues a checkpoint (round ``progress["round"]`` was already evaluated).
    on_round : callable, optional
        Called with every new metrics line.
    started : float, optional
        ``time.time()`` when this process started the run (default: now).
    """

    def __init__(self, rt: Runtime, flower: FlowerLoRAStrategy, outer, folder: RunFolder, plan, progress: dict[str, Any],
                 history: list[dict[str, Any]], resume: bool = False,
                 on_round: Callable[[dict[str, Any]], None] | None = None, started: float | None = None):
        self.rt, self.flower, self.outer, self.folder, self.plan = rt, flower, outer, folder, plan
        self.history, self.resume, self.on_round = history, resume, on_round
        self.done = progress["round"]
        self.wall_before = progress["wall_s"]
        self.totals = {"up": progress["cum_bytes_up"], "down": progress["cum_bytes_down"]}
        self.t0 = time.time() if started is None else started
        fed = rt.cfg.federation
        self.last_round = fed.num_rounds
        self.evaluated = evaluated_rounds(fed.num_rounds, fed.eval_every)
        self.test_size = test_set_size(rt)
        self.subset = eval_subset(fed.eval_examples, self.test_size, fed.seed)

    def elapsed(self) -> float:
        """Wall seconds of the run, the time before a resume included."""
        return round(self.wall_before + time.time() - self.t0, 3)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.done  # Flower counts from the resume point
        if self.resume and server_round == self.done:  # evaluated before the stop
            return None
        flower = self.flower
        flower.adopt(arrays)
        if server_round not in self.evaluated:
            result, examples = _not_evaluated(self.rt.model.task), 0
        elif server_round in (0, self.last_round) or self.subset is None:
            result, examples = evaluate_global(self.rt, flower.state), self.test_size
        else:
            result, examples = evaluate_global(self.rt, flower.state, self.subset), len(self.subset)
        line = self._line(server_round, result, examples, flower.rounds.get(server_round))
        self.history.append(line)
        self.folder.append_metrics(line)
        self.folder.save_checkpoint(flower.state, {"round": server_round, "cum_bytes_up": self.totals["up"],
                                                   "cum_bytes_down": self.totals["down"], "wall_s": line["wall_s"],
                                                   "dp": dp_checkpoint(flower, self.outer)})
        if self.on_round:
            self.on_round(line)
        return MetricRecord({k: float(v) for k, v in result.items() if v is not None}) if examples else None

    def _line(self, server_round: int, result: dict[str, float | None], examples: int, log_) -> dict[str, Any]:
        """The round's ``metrics.jsonl`` line (``log_``: the strategy's record of the round, None for round 0;
        ``examples``: the test examples its accuracy is on, 0 when the round was not evaluated)."""
        flower = self.flower
        up, down = (log_.bytes_up, log_.bytes_down) if log_ else (0, 0)
        self.totals["up"] += up
        self.totals["down"] += down
        return {
            "round": server_round,
            **result,
            "eval_examples": examples,
            "train_loss": log_.train_loss if log_ else None,
            "aggregation_error": log_.aggregation_error if log_ else None,
            "bytes_up": up,
            "bytes_down": down,
            "cum_bytes_up": self.totals["up"],
            "cum_bytes_down": self.totals["down"],
            # Under client-level DP who was sampled is secret (the accountant's amplification rests on it).
            "clients": None if flower.client_dp else (log_.clients if log_ else []),
            "failed": log_.failed if log_ else [],
            "client_compute_s": log_.compute_s if log_ else None,
            "skipped": log_.skipped if log_ else [],  # sampled clients with no examples
            "retries": log_.retries if log_ else [],  # tries voided for fewer than federation.min_clients answers
            **(_client_accuracy(log_) if flower.client_eval else {}),
            **round_privacy(self.plan, flower, log_, server_round),
            "wall_s": self.elapsed(),
        }
