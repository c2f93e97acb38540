"""``fedpeft.audit(...)``: an audit from Python, as ``fedpeft audit`` runs it without the progress display."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft.config import Config
from fedpeft.validation import load_config
from fedpeft.environment import quiet_environment
from fedpeft.validation import load_config


def audit(config: str | Path | Config | None = None, *, overrides: Sequence[str] = (), out: str | Path | None = None,
          on_victim: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run a privacy audit and write ``audit.json`` and ``audit.md`` into ``out``.

    Parameters
    ----------
    config : str, Path, Config or None
        A TOML config file, a :class:`Config`, or None for the embedded
        default; its ``[audit]`` section says what to attack.
    overrides : sequence of str
        ``section.key=value`` strings, as ``fedpeft audit --set`` takes them.
    out : str or Path, optional
        The audit folder (absent or empty); default ``runs/<timestamp>-audit-<federation.name>``.
    on_victim : callable, optional
        Progress: ``on_victim(description, done, total)``.

    Returns
    -------
    dict
        The audit's result, the same dict ``audit.json`` holds.

    Raises
    ------
    fedpeft.errors.FedPeftError
        For a bad config or a busy ``out`` folder, before anything is written.
    """
    quiet_environment()
    cfg = load_config(config, overrides)
    from fedpeft.audit.attacks import build_attacks
    from fedpeft.server.run_folder import new_output_folder

    build_attacks(cfg.audit)  # an unknown attack or a bad parameter fails here, before anything is written
    target = new_output_folder(out, Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-audit-{cfg.federation.name}")
    from fedpeft.audit.report import write_report
    from fedpeft.audit.runner import run_audit

    result = run_audit(cfg, progress=on_victim)
    write_report(result, target)
    return result
