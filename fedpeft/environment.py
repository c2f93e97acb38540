"""Process set-up: offline, no telemetry, quiet libraries.

A leaf module (it imports nothing from fedpeft), called once per process by
every entry point: the CLI, the Python API and the Flower apps' handlers
(a Ray worker or a ``flwr run`` process starts without the CLI).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


@functools.cache
def quiet_environment() -> None:
    """Offline, no telemetry, and only warnings from Flower and Ray (once per process)."""
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
