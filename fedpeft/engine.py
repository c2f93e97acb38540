"""Execution engines: where the ServerApp's messages reach the ClientApp.

* ``simulation``: Flower's simulation runtime with its Ray backend, one worker
  process per ``federation.client_cpus`` cores. This is the one place that
  calls ``flwr.simulation.run_simulation`` (deprecated upstream in favour of
  ``flwr run``, which fedpeft also supports through ``[tool.flwr.app]``).
* ``inprocess``: the same ServerApp logic and ClientApp handlers, messages
  delivered by a direct call in this process. No Ray start-up and one resident
  model for every client, so short runs and large sweeps are faster; clients
  run one after another (torch uses all cores for each).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedpeft.config import Config

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def quiet_environment() -> None:
    """Offline, no telemetry, and only warnings from Flower and Ray."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Flower warns at every start that run_simulation is deprecated; fedpeft
    # knows (and supports `flwr run .` too), so only its errors are shown.
    logging.getLogger("flwr").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> None:
    """Run ``cfg`` on the engine it names; results land in (or, with ``resume``, continue) ``out``."""
    if cfg.federation.engine == "inprocess":
        run_inprocess_engine(cfg, out, on_round, resume)
    else:
        run_simulation_engine(cfg, out, on_round, resume)


def run_inprocess_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> None:
    quiet_environment()
    from fedpeft.client import make_client_app
    from fedpeft.server.app import run_federation
    from fedpeft.server.inprocess_grid import InProcessGrid

    run_federation(InProcessGrid(make_client_app(cfg), cfg.federation.num_clients), cfg, out, on_round, resume)


def run_simulation_engine(cfg: Config, out: Path, on_round=None, resume: bool = False) -> None:
    """Run ``cfg`` in Flower's simulation engine; results land in ``out``.

    Ray starts once per call (about 7 s) and keeps one worker per
    ``federation.client_cpus`` cores; each worker loads the model once.
    """
    quiet_environment()
    from flwr.simulation import run_simulation

    from fedpeft.client import make_client_app
    from fedpeft.server import make_server_app

    server_app = make_server_app(cfg, out, on_round, resume)
    client_app = make_client_app(cfg)
    backend_config = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": os.cpu_count(),
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.federation.num_clients,
        backend_config=backend_config,
    )
