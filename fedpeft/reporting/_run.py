"""Look-ups on a run's ``summary`` shared by the report and the plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Partitioners whose split is controlled by ``data.alpha``.
_ALPHA_PARTITIONS = ("dirichlet",)


def config_value(summary: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Read ``section.key`` from the resolved config in ``summary["config"]``.

    Parameters
    ----------
    summary : mapping
        The run's ``summary.json``.
    dotted : str
        Key path such as ``"train.lr"``.
    default : object
        Returned when any part of the path is missing.
    """
    node: Any = summary.get("config") or {}
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def pick(summary: Mapping[str, Any], key: str, dotted: str | None = None) -> Any:
    """``summary[key]`` if present and not None, else the config's ``dotted`` value."""
    value = summary.get(key)
    if value is None and dotted is not None:
        value = config_value(summary, dotted)
    return value


def partition_label(summary: Mapping[str, Any]) -> str | None:
    """``"dirichlet (α = 0.5)"``, ``"iid"``, ... or None when unknown."""
    partition = pick(summary, "partition", "data.partition")
    if partition is None:
        return None
    alpha = pick(summary, "alpha", "data.alpha")
    if alpha is not None and str(partition) in _ALPHA_PARTITIONS:
        return f"{partition} (α = {alpha:g})"
    return str(partition)


def plot_title(summary: Mapping[str, Any]) -> str:
    """A figure title naming the run, model, strategy and partition."""
    parts = [
        pick(summary, "model", "model.name"),
        pick(summary, "strategy", "strategy.name"),
        partition_label(summary),
    ]
    details = ", ".join(str(p) for p in parts if p is not None)
    name = summary.get("name")
    if name and details:
        return f"{name}: {details}"
    return str(name or details or "fedpeft run")


def dp_unit(summary: Mapping[str, Any]) -> str | None:
    """``"sample-level"`` / ``"client-level"`` from ``dp.mode``, None without DP."""
    mode = pick(summary, "dp_mode", "dp.mode")
    if mode in (None, "none"):
        return None
    return {"sample": "sample-level", "client": "client-level"}.get(str(mode), str(mode))


def rounds_trained(summary: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> int:
    """Number of training rounds actually run (round 0 is evaluation only)."""
    rounds = [int(m["round"]) for m in metrics if m.get("round") is not None]
    if rounds:
        return max(rounds)
    return int(summary.get("num_rounds") or 0)
