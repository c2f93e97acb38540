"""Flower ``ServerApp``: one federation from initial adapter to run folder.

The server keeps its own resident copy of the model for centralised
evaluation (round 0 included) and for exporting the final adapter.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import Config, client_ranks
from fedpeft.validation import config_from_run_config
from fedpeft.environment import quiet_environment
from fedpeft.runtime import runtime
from fedpeft.privacy.client_level import wrap_client_dp
from fedpeft.privacy.secret import secret_source
from fedpeft.errors import FedPeftError
from fedpeft.server.fault_injection import FaultInjectingGrid
from fedpeft.server.flower_strategy import FlowerLoRAStrategy, global_payload
from fedpeft.server.privacy_log import restore_wrapper, run_privacy
from fedpeft.server.round_quorum import RoundQuorum
from fedpeft.server.round_recorder import RoundRecorder
from fedpeft.server.run_folder import RunFolder, default_run_dir, machine_description
from fedpeft.wire import METRICS, NUM_CLIENTS, to_array_record

OnRound = Callable[[dict[str, Any]], None]

FLOWER_TIMEOUT = 3600.0
"""Seconds Flower waits for a round's replies when ``federation.round_timeout`` is 0 (Flower's own default)."""


def discover_nodes(grid: Grid, num_nodes: int, num_clients: int, timeout: float = 600.0) -> list[int]:
    """Ask every node to get ready; returns their Flower node ids, sorted.

    Nodes are executors, not clients: each message names the client it runs
    as, so this asks the ``num_nodes`` nodes (not every client) once.
    Answering makes each worker build its data and model before round 1, so
    round timings are not skewed by it, and says how many clients its config
    partitions the data into, which must be the server's.
    """
    node_ids = sorted(grid.get_node_ids())
    if len(node_ids) != num_nodes:
        raise RuntimeError(
            f"the federation has {len(node_ids)} nodes but federation.num_nodes = {num_nodes} "
            "(0 means min(federation.num_clients, clients per round)); start that many nodes "
            "(flwr run: --federation-config \"num-supernodes=N\") or set federation.num_nodes"
        )
    messages = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    ready, errors = 0, []
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            errors.append(reply.error.reason)
            continue
        seen = int(reply.content[METRICS][NUM_CLIENTS])
        if seen != num_clients:
            raise RuntimeError(f"node {reply.metadata.src_node_id} partitions the data for {seen} clients, the server "
                               f"for federation.num_clients = {num_clients}: every node must run the server's config")
        ready += 1
    if ready != num_nodes:
        detail = f": {errors[0]}" if errors else ""
        raise RuntimeError(f"only {ready} of {num_nodes} nodes answered{detail}")
    return node_ids


def _mean_client_accuracy(line: dict[str, Any]) -> float | None:
    """Mean of the clients' accuracies on their own shards (personalised rules)."""
    values = list(line.get("client_accuracy", {}).values())
    return float(sum(values) / len(values)) if values else None


def run_federation(grid: Grid, cfg: Config, out: Path, on_round: OnRound | None = None, resume: bool = False) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid`` and write the run folder ``out``.

    With ``resume``, continue ``out`` from its last checkpoint: rounds, seeds
    and sampling are absolute, so the result equals a run that never stopped.
    """
    t0 = time.time()
    folder = RunFolder(out)
    rt = runtime(cfg, threads=cfg.federation.threads or os.cpu_count())
    strategy = rt.strategy
    initial = rt.model.initial
    plan = rt.dp_plan  # before anything is written: an unreachable target is a config error
    loaded = folder.resume_point(initial) if resume else None
    if loaded is not None:
        state, progress, history = loaded
        folder.keep_metrics(history)  # only now that every check passed: the lines after the checkpoint go
    else:  # a new run, or one killed before its first checkpoint: that starts again from round 0
        resume = False
        folder.create(cfg.to_dict())
        ranks = {str(c): r for c, r in client_ranks(cfg).items()} if cfg.peft.client_ranks else None
        state = strategy.initialize(initial.factors, extras=initial.extras, client_ranks=ranks)
        progress, history = {"round": 0, "cum_bytes_up": 0, "cum_bytes_down": 0, "wall_s": 0.0}, []
    done = progress["round"]
    nodes = discover_nodes(grid, cfg.num_nodes, cfg.federation.num_clients)
    # Accuracy on a client's own shard is not privatised: under DP it stays on the client.
    client_eval = (cfg.federation.client_eval or strategy.personalised) and plan is None
    dp_progress = progress.get("dp", {})
    secret = secret_source(cfg.dp) if plan is not None else None
    flower = FlowerLoRAStrategy(strategy, state, nodes, cfg.clients_per_round, cfg.federation.seed, client_eval, done,
                                dp_plan=plan, dp_steps=dp_progress.get("steps"), dp_epsilon=dp_progress.get("epsilon"),
                                secret=secret, num_clients=cfg.federation.num_clients,
                                shard_sizes=[len(s) for s in rt.shards],
                                client_eval_clients=cfg.federation.client_eval_clients,
                                max_update_norm=cfg.federation.max_update_norm,
                                min_clients=cfg.federation.min_clients, round_timeout=cfg.federation.round_timeout)
    outer = flower
    if plan is not None and plan.unit == "client":
        outer = wrap_client_dp(flower, cfg.dp, plan.noise_multiplier, cfg.clients_per_round, flower.private_keys(),
                               secret, round_offset=done)
        restore_wrapper(outer, dp_progress.get("wrapper"))
    fed = cfg.federation
    if fed.failure_rate > 0 or fed.straggler_rate > 0:
        grid = FaultInjectingGrid(grid, fed.failure_rate, fed.straggler_rate, fed.seed,
                                  secret if flower.client_dp else None)
    quorum = RoundQuorum(outer, flower, fed.round_retries, retry_refused=_retry_refused(cfg, plan))
    recorder = RoundRecorder(rt, flower, outer, folder, plan, progress, history, resume=resume, on_round=on_round,
                             started=t0)
    if done < cfg.federation.num_rounds:  # else killed after the last round's checkpoint: only the outputs are left
        quorum.start(
            grid=grid,
            initial_arrays=to_array_record(global_payload(state).arrays()),
            num_rounds=cfg.federation.num_rounds - done,
            timeout=fed.round_timeout or FLOWER_TIMEOUT,
            evaluate_fn=recorder,
        )
    folder.export_adapter(rt.model, global_payload(flower.state))
    final = history[-1]
    summary = {
        "name": cfg.federation.name,
        "strategy": cfg.strategy_name,
        "strategy_params": strategy.params(),
        "model": cfg.model.name,
        "task": rt.model.task,
        "dataset": cfg.data.dataset,
        "partition": cfg.data.partition,
        "num_rounds": cfg.federation.num_rounds,
        "num_clients": cfg.federation.num_clients,
        "clients_per_round": cfg.clients_per_round,
        "final_accuracy": final["accuracy"],
        "final_loss": final["loss"],
        "final_perplexity": final.get("perplexity"),
        "initial_accuracy": history[0]["accuracy"],
        "final_client_accuracy": _mean_client_accuracy(final),
        "majority_baseline": (rt.data.majority_baseline_on(cfg.data.max_test_examples)
                              if rt.model.task == "classification" else None),
        "bytes_up": recorder.totals["up"],
        "bytes_down": recorder.totals["down"],
        "full_finetune_bytes_per_round": 2 * cfg.clients_per_round * rt.model.full_model_nbytes(),
        "trainable_params": rt.model.client_trainable_params(strategy.trainable),
        "total_params": rt.model.total_params,
        **run_privacy(plan, flower, history, secret),
        "wall_s": recorder.elapsed(),
        "seed": cfg.federation.seed,
        "device": str(rt.model.device),
        "dtype": cfg.model.dtype,
        "machine": machine_description(rt.model.device),
        "config": cfg.to_dict(),
    }
    folder.write_summary(summary)
    folder.write_report(summary, history)
    return summary


def _retry_refused(cfg: Config, plan) -> str | None:
    """Why this run may not run a round again (see :mod:`fedpeft.server.round_quorum`), None if it may."""
    if plan is None or plan.unit != "sample" or cfg.dp.target_epsilon <= 0:
        return None
    return (f"the DP-SGD noise is calibrated for dp.target_epsilon = {cfg.dp.target_epsilon:g} over each client's "
            "planned rounds, and another try would train clients beyond it; lower federation.min_clients, or set "
            "dp.noise_multiplier with dp.target_epsilon = 0 (the reported epsilon then counts the extra tries)")


def make_server_app(cfg: Config | None = None, out: Path | None = None, on_round: OnRound | None = None,
                    resume: bool = False, on_summary: Callable[[dict[str, Any]], None] | None = None,
                    on_error: Callable[[FedPeftError], None] | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` writing to (or, with ``resume``, continuing) ``out``;
    without them, both come from the run config (``flwr run .``). ``on_summary``
    receives the finished run's summary; ``on_error``, when given, a user-facing
    error that stopped it (Flower's simulation would only log it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        quiet_environment()
        conf = cfg if cfg is not None else config_from_run_config(context.run_config)
        target = out or Path(str(context.run_config.get("out") or default_run_dir(conf)))
        try:
            summary = run_federation(grid, conf, target, on_round, resume)
        except FedPeftError as exc:
            if on_error is None:
                raise
            on_error(exc)
            return
        if on_summary is not None:
            on_summary(summary)

    return app


# ``flwr run .`` loads this object (pyproject [tool.flwr.app.components]).
app = make_server_app()
