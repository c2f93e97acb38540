"""Execution engines: where the ServerApp's messages reach the ClientApp.

* ``simulation``: Flower's simulation runtime with its Ray backend, one worker
  process per ``federation.client_cpus`` cores. This is the one place that
  calls ``flwr.simulation.run_simulation`` (deprecated upstream in favour of
  ``flwr run``, which fedpeft also supports through ``[tool.flwr.app]``).
* ``inprocess``: the same ServerApp logic and ClientApp handlers, messages
  delivered by a direct call in this process. No Ray start-up and one resident
  model for every client, so short runs and large sweeps are faster; clients
  run one after another (torch uses all cores for each).
* ``batched``: in-process too, but each round's sampled clients train
  together: their adapters stacked over the one resident base, one batched
  forward and backward pass per local step, in chunks of
  ``federation.batch_clients`` (``fedpeft.server.batched_grid``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedpeft.config import Config
from fedpeft.devices import gpu_share, resolve
from fedpeft.environment import quiet_environment


def run_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on the engine it names; results land in (or, with ``resume``, continue) ``out``.

    Returns the run's summary (what ``summary.json`` holds).
    """
    if cfg.federation.engine == "inprocess":
        return run_inprocess_engine(cfg, out, on_round, resume)
    if cfg.federation.engine == "batched":
        return run_batched_engine(cfg, out, on_round, resume)
    return run_simulation_engine(cfg, out, on_round, resume)


def run_inprocess_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> dict[str, Any]:
    quiet_environment()
    from fedpeft.client import make_client_app
    from fedpeft.server.app import run_federation
    from fedpeft.server.inprocess_grid import InProcessGrid

    return run_federation(InProcessGrid(make_client_app(cfg), cfg.num_nodes), cfg, out, on_round, resume)


def run_batched_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> dict[str, Any]:
    quiet_environment()
    from fedpeft.client import make_client_app
    from fedpeft.server.app import run_federation
    from fedpeft.server.batched_grid import BatchedGrid

    return run_federation(BatchedGrid(make_client_app(cfg), cfg), cfg, out, on_round, resume)


def run_simulation_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> dict[str, Any]:
    """Run ``cfg`` in Flower's simulation engine; results land in ``out``.

    Ray starts once per call (about 7 s) and keeps one worker per
    ``federation.client_cpus`` cores; each worker loads the model once.
    Flower runs ``federation.num_nodes`` SuperNodes (not one per client):
    each message names the client it runs as.
    """
    quiet_environment()
    from flwr.simulation import run_simulation

    from fedpeft.client import make_client_app
    from fedpeft.server import make_server_app

    summaries: list[dict[str, Any]] = []  # the ServerApp runs in a thread of this process
    errors: list[Exception] = []
    server_app = make_server_app(cfg, out, on_round, resume, on_summary=summaries.append, on_error=errors.append)
    client_app = make_client_app(cfg)
    backend_config = simulation_backend_config(cfg)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.num_nodes,
        backend_config=backend_config,
    )
    if errors:
        raise errors[0]
    if not summaries:
        raise RuntimeError(f"Flower's simulation ended without the ServerApp finishing the run in {out}; see its log above")
    return summaries[0]


def simulation_backend_config(cfg: Config) -> dict[str, Any]:
    """The Ray backend config of ``run_simulation``: each client worker's resources and Ray's start-up.

    With ``federation.ray_address`` the workers run on that Ray cluster
    (every node needs fedpeft, its pinned packages and the model assets
    installed). A worker reserves ``federation.client_cpus`` cores and, on a CUDA
    ``federation.device``, ``federation.client_gpus`` of a GPU (Ray then sets
    the worker's ``CUDA_VISIBLE_DEVICES`` to the GPU it shares, and
    :func:`fedpeft.devices.client_device` puts the client's model there).
    """
    fed = cfg.federation
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    # On a cluster its nodes say what they have; this machine's core count is not Ray's to set.
    where = {"address": fed.ray_address} if fed.ray_address else {"num_cpus": os.cpu_count(), "include_dashboard": False}
    return {
        "client_resources": {"num_cpus": fed.client_cpus, "num_gpus": gpu_share(fed.client_gpus, resolve(fed.device))},
        "init_args": {**where, **quiet},
    }
