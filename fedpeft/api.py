"""The Python entry point ``fedpeft.run`` (``fedpeft.audit`` is :func:`fedpeft.audit.entry.audit`).

It does what ``fedpeft run`` does, without the progress
display, and return what the run folder records::

    import fedpeft
    summary = fedpeft.run("experiments/dp_utility.toml", overrides=["federation.seed=1"], out="runs/dp1")
    summary["final_accuracy"], summary["epsilon"]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft.config import Config
from fedpeft.validation import load_config
from fedpeft.environment import quiet_environment

ConfigLike = str | Path | Config | None
"""A config file, a :class:`Config`, or None for the embedded default."""


def run(config: ConfigLike = None, *, overrides: Sequence[str] = (), out: str | Path | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one federation and write its run folder.

    Parameters
    ----------
    config : str, Path, Config or None
        A TOML config file, a :class:`Config`, or None for the embedded default
        (``experiments/default.toml``).
    overrides : sequence of str
        ``section.key=value`` strings, as ``fedpeft run --set`` takes them.
    out : str or Path, optional
        The run folder (absent or empty); default ``runs/<timestamp>-<federation.name>``.
    on_round : callable, optional
        Called with each round's ``metrics.jsonl`` line as it is written.

    Returns
    -------
    dict
        The run's summary, the same dict ``summary.json`` holds.

    Raises
    ------
    fedpeft.errors.FedPeftError
        For a bad config, a missing asset or a busy ``out`` folder, before anything is written.
    """
    quiet_environment()
    cfg = load_config(config, overrides)
    from fedpeft.server.run_folder import default_run_dir, new_output_folder

    target = new_output_folder(out, default_run_dir(cfg))
    from fedpeft.engine import run_engine

    return run_engine(cfg, target, on_round)
