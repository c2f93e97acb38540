"""PNG figures of a finished run: accuracy, bytes on the wire, and epsilon.

Figures are built with :class:`matplotlib.figure.Figure` rather than pyplot, so
nothing is registered with a GUI backend or pyplot's figure manager: PNGs are
rendered by Agg whatever backend the caller has selected, and each figure is
freed once saved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from fedpeft.reporting._run import dp_unit, pick, plot_title
from fedpeft.reporting.console import format_bytes, has_values

DPI = 120
ROUND_LABEL = "round (0 = before training)"

Metrics = Sequence[Mapping[str, Any]]


def _series(metrics: Metrics, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Rounds and values of ``key``, skipping rounds where it is None or absent."""
    pairs = [(m["round"], m[key]) for m in metrics if m.get(key) is not None and m.get("round") is not None]
    if not pairs:
        return np.array([], dtype=int), np.array([], dtype=float)
    rounds, values = zip(*pairs)
    return np.asarray(rounds, dtype=int), np.asarray(values, dtype=float)


def _cumulative(metrics: Metrics, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative bytes sent ``direction`` ("up" or "down") after each round."""
    if has_values(metrics, f"cum_bytes_{direction}"):
        return _series(metrics, f"cum_bytes_{direction}")
    rows = [m for m in metrics if m.get("round") is not None]
    rounds = np.asarray([m["round"] for m in rows], dtype=int)
    per_round = np.asarray([m.get(f"bytes_{direction}") or 0 for m in rows], dtype=float)
    return rounds, np.cumsum(per_round)


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A log axis cannot show the zero bytes of round 0.
    keep = y > 0
    return x[keep], y[keep]


def _integer_rounds(ax: Any, metrics: Metrics) -> None:
    """Integer round ticks over every round of the run, even those with no point drawn."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    rounds = [int(m["round"]) for m in metrics if m.get("round") is not None]
    if rounds:
        lo, hi = min(rounds), max(rounds)
        pad = max(0.05 * (hi - lo), 0.2)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(ROUND_LABEL)
    ax.grid(True, alpha=0.3)


def _byte_tick(value: float, _pos: int) -> str:
    return format_bytes(value).replace(".0 ", " ")


def _byte_axis(ax: Any, values: Sequence[float]) -> None:
    """Log y axis with SI byte labels and enough ticks for any span of data."""
    ax.set_yscale("log")
    positive = [v for v in values if v > 0]
    decades = math.log10(max(positive) / min(positive)) if positive else 0.0
    # Narrow spans get 1-2-5 (or every-digit) ticks so the axis is never unlabelled.
    if decades < 1:
        subs: Sequence[float] | None = tuple(range(1, 10))
    elif decades < 2:
        subs = (1.0, 2.0, 5.0)
    else:
        subs = None
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs) if subs else LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(_byte_tick))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _nothing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", transform=ax.transAxes, ha="center", va="center", color="grey")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()
    return path


def plot_accuracy(
    metrics: Metrics,
    path: str | Path,
    baseline: float | None = None,
    title: str = "Test accuracy per round",
) -> Path:
    """Plot test accuracy (top) and test/train loss (bottom) per round.

    Parameters
    ----------
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``.
    path : str or Path
        Where to write the PNG; parent folders are created.
    baseline : float or None
        Accuracy of always predicting the majority class, drawn dashed.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    language_model = has_values(metrics, "perplexity")
    show_loss = has_values(metrics, "loss") or has_values(metrics, "train_loss")
    fig = Figure(figsize=(7, 6.5 if show_loss else 4))
    axes = fig.subplots(2 if show_loss else 1, 1, sharex=True, squeeze=False)[:, 0]

    ax = axes[0]
    rounds, acc = _series(metrics, "accuracy")
    acc_label = "test next-token accuracy" if language_model else "test accuracy"
    ax.plot(rounds, acc, marker="o", color="C0", label=acc_label)
    if not len(rounds):
        _nothing(ax, "accuracy")
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label=f"majority baseline ({100 * baseline:.1f}%)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylabel(acc_label)
    ax.legend(loc="best")
    _integer_rounds(ax, metrics)

    if show_loss:
        ax = axes[1]
        rounds, loss = _series(metrics, "loss")
        if len(rounds):
            ax.plot(rounds, loss, marker="o", color="C1", label="test loss")
        rounds, train_loss = _series(metrics, "train_loss")
        if len(rounds):
            ax.plot(rounds, train_loss, marker="s", color="C2", linestyle=":", label="train loss (client mean)")
        ax.set_ylabel("cross-entropy loss")
        ax.legend(loc="best")
        _integer_rounds(ax, metrics)
        axes[0].set_xlabel("")

    fig.suptitle(title)
    return _save(fig, path)


def plot_bytes(
    metrics: Metrics,
    full_finetune_bytes_per_round: float | None,
    path: str | Path,
    title: str = "Cumulative bytes on the wire",
) -> Path:
    """Plot cumulative bytes up, down and in total per round on a log scale.

    Parameters
    ----------
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``; ``cum_bytes_*`` are used when present,
        otherwise ``bytes_*`` are summed.
    full_finetune_bytes_per_round : float or None
        Bytes that sending the full model both ways to the sampled clients
        would cost per round; drawn dashed as a cumulative line.
    path : str or Path
        Where to write the PNG; parent folders are created.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Units are SI (base 1000), as in :func:`fedpeft.reporting.format_bytes`.
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted: list[float] = []

    up_rounds, up = _cumulative(metrics, "up")
    down_rounds, down = _cumulative(metrics, "down")
    series = [("up (clients → server)", up_rounds, up, "C0", "o"),
              ("down (server → clients)", down_rounds, down, "C1", "s")]
    if np.array_equal(up_rounds, down_rounds) and len(up_rounds):
        series.append(("total", up_rounds, up + down, "C2", "^"))
    for label, x, y, color, marker in series:
        x, y = _positive(x, y)
        if len(x):
            ax.plot(x, y, marker=marker, color=color, label=f"{label}: {format_bytes(y[-1])}")
            plotted.extend(y.tolist())

    if full_finetune_bytes_per_round:
        rounds = np.asarray(sorted({int(m["round"]) for m in metrics if m.get("round") is not None}))
        x, y = _positive(rounds, rounds * float(full_finetune_bytes_per_round))
        if len(x):
            ax.plot(x, y, color="black", linestyle="--", marker="x",
                    label=f"full fine-tuning, up + down: {format_bytes(y[-1])}")
            plotted.extend(y.tolist())

    if plotted:
        _byte_axis(ax, plotted)
        ax.legend(loc="best", fontsize="small")
    else:
        _nothing(ax, "bytes")
    ax.set_ylabel("cumulative bytes (log scale, SI units)")
    _integer_rounds(ax, metrics)
    ax.set_title(title)
    return _save(fig, path)


def plot_epsilon(
    metrics: Metrics,
    path: str | Path,
    delta: float | None = None,
    unit: str | None = None,
    title: str = "Privacy spent per round",
) -> Path:
    """Plot the cumulative differential-privacy epsilon after each round.

    Parameters
    ----------
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``; rounds with ``epsilon`` None are skipped.
    path : str or Path
        Where to write the PNG; parent folders are created.
    delta : float or None
        The delta of the guarantee, named on the axis.
    unit : str or None
        What is protected, e.g. ``"sample-level"`` or ``"client-level"``.
    title : str
        Figure title.

    Returns
    -------
    Path
        ``path``.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    rounds, eps = _series(metrics, "epsilon")
    ax.plot(rounds, eps, marker="o", color="C3", label="ε")
    label = "ε" + (f" at δ = {delta:g}" if delta is not None else "")
    if unit:
        label = f"{unit} {label}"
    ax.set_ylabel(label)
    ax.set_ylim(bottom=0)
    _integer_rounds(ax, metrics)
    ax.set_title(title)
    return _save(fig, path)


def write_plots(run_dir: str | Path, summary: Mapping[str, Any], metrics: Metrics) -> list[Path]:
    """Write the run's figures into ``run_dir/plots``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    summary : mapping
        The run's ``summary.json``.
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``.

    Returns
    -------
    list of Path
        ``plots/accuracy.png``, ``plots/bytes.png`` and, when any round has an
        epsilon, ``plots/epsilon.png``.
    """
    plots = Path(run_dir) / "plots"
    context = plot_title(summary)
    written = [
        plot_accuracy(metrics, plots / "accuracy.png", baseline=summary.get("majority_baseline"),
                      title=f"Test accuracy per round\n{context}"),
        plot_bytes(metrics, summary.get("full_finetune_bytes_per_round"), plots / "bytes.png",
                   title=f"Cumulative bytes on the wire\n{context}"),
    ]
    if has_values(metrics, "epsilon"):
        delta = pick(summary, "delta", "dp.delta")
        written.append(plot_epsilon(metrics, plots / "epsilon.png", delta=delta, unit=dp_unit(summary),
                                    title=f"Privacy spent per round\n{context}"))
    return written


__all__ = ["plot_accuracy", "plot_bytes", "plot_epsilon", "write_plots"]
