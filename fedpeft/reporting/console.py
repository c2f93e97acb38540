"""Human-readable numbers and the per-round table printed in the terminal."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
MISSING = "–"


def format_bytes(n: float | None) -> str:
    """Format a byte count with decimal (SI, base 1000) units.

    Base 1000 is used everywhere in ``fedpeft.reporting``: 1 kB = 1000 B,
    1 MB = 1000 kB, and so on, so that powers of ten on a log axis read as
    round numbers.

    Parameters
    ----------
    n : float or None
        Number of bytes. ``None`` (not recorded) and NaN give ``"–"``.

    Returns
    -------
    str
        ``"0 B"``, ``"999 B"``, ``"1.5 kB"``, ``"12.3 MB"``, ``"123 GB"``:
        at most three significant digits, one decimal below 100.

    Examples
    --------
    >>> format_bytes(1_500_000)
    '1.5 MB'
    >>> format_bytes(999)
    '999 B'
    """
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return MISSING
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 1000:
        return f"{sign}{value:.0f} B"
    unit = 0
    while value >= 1000 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
    text = f"{value:.1f}" if value < 99.95 else f"{value:.0f}"
    # 999.96 kB would otherwise print as "1000 kB".
    if float(text) >= 1000 and unit < len(_UNITS) - 1:
        value /= 1000
        unit += 1
        text = f"{value:.1f}"
    return f"{sign}{text} {_UNITS[unit]}"


def format_float(x: float | None, digits: int = 4) -> str:
    """Format a float with ``digits`` decimals, ``"–"`` when absent."""
    if x is None:
        return MISSING
    return f"{x:.{digits}f}"


def format_percent(x: float | None, digits: int = 2) -> str:
    """Format a fraction (0.8432) as a percentage ("84.32%"), ``"–"`` when absent."""
    if x is None:
        return MISSING
    return f"{100 * x:.{digits}f}%"


def format_duration(seconds: float | None) -> str:
    """Format seconds as ``"42.0 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def has_values(metrics: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether any round recorded a non-None value for ``key``."""
    return any(m.get(key) is not None for m in metrics)


def failed_clients(row: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The round's failed or rejected clients (``[]`` when none were recorded)."""
    return list(row.get("failed") or [])


def round_table(metrics: Sequence[Mapping[str, Any]], title: str | None = "Rounds") -> Table:
    """Build a rich table with one row per round.

    Parameters
    ----------
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``; round 0 is the evaluation before training.
    title : str or None
        Table title.

    Returns
    -------
    rich.table.Table
        Columns round, accuracy, loss, bytes up and bytes down (SI units, see
        :func:`format_bytes`), plus epsilon and failed clients when any round
        has them.
    """
    show_eps = has_values(metrics, "epsilon")
    show_failed = any(failed_clients(m) for m in metrics)
    table = Table(title=title)
    table.add_column("Round", justify="right")
    table.add_column("Accuracy", justify="right")
    table.add_column("Loss", justify="right")
    table.add_column("Bytes up", justify="right")
    table.add_column("Bytes down", justify="right")
    if show_eps:
        table.add_column("ε", justify="right")
    if show_failed:
        table.add_column("Failed", justify="left")
    for m in metrics:
        cells = [
            str(m.get("round", MISSING)),
            format_percent(m.get("accuracy")),
            format_float(m.get("loss")),
            format_bytes(m.get("bytes_up")),
            format_bytes(m.get("bytes_down")),
        ]
        if show_eps:
            cells.append(format_float(m.get("epsilon"), 2))
        if show_failed:
            cells.append(", ".join(str(f.get("client")) for f in failed_clients(m)) or "")
        table.add_row(*cells)
    return table
