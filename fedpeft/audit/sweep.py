"""Audit sweep: attack success against epsilon, LoRA rank and batch size, as a table and a plot.

A sweep file (``experiments/audit_sweep.toml``) names a base setting (a list
of ``--set`` overrides) and axes; each axis is a config key and its values,
plus overrides of its own. Every point is one ``fedpeft audit`` main
experiment (no studies) of ``victims`` victims; the plot shows, per axis, the
span attack's token recall, the head inversion's cosine and the label
accuracy, each with its bootstrap interval and its prior-only baseline.

``full = true`` (``fedpeft audit --sweep FILE --full``) uses the file's
``full_victims`` and each axis's ``full_values``; an axis may cap its
victims with its own ``victims`` / ``full_victims``.
"""

from __future__ import annotations

import json
import math
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedpeft.errors import ConfigError

SWEEP_JSON = "audit_sweep.json"
SWEEP_MD = "audit.md"
SWEEP_PNG = "plots/audit_sweep.png"

# (attack, metric, label) drawn on every panel.
CURVES = (
    ("lora-span", "token recall", "span attack: token recall"),
    ("linear-inversion", "cosine classifier input", "head inversion: cosine"),
    ("label-recovery", "label accuracy", "label recovery: accuracy"),
)


@dataclass(frozen=True)
class Point:
    """One audit of the sweep: its axis, x value and the overrides that make it."""

    axis: str
    value: Any
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class SweepSpec:
    name: str
    victims: int
    axes: list[dict[str, Any]]
    points: list[Point]
    config: Path | None = None


def load_sweep(path: Path, full: bool, extra: list[str], config: Path | None = None) -> SweepSpec:
    """Read and check a sweep file; every point's config is validated before anything runs.

    ``config`` is the base config file (None: the default); ``extra`` are
    ``--set`` overrides applied after each point's own.

    Raises
    ------
    ConfigError
        One line naming the file and the key at fault.
    """
    from fedpeft.audit.attacks import build_attacks
    from fedpeft.validation import load_config

    try:
        spec = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--sweep {path}: cannot read it as a TOML sweep file ({exc})") from None
    sweep = spec.get("sweep")
    if not isinstance(sweep, dict):
        raise ConfigError(f"--sweep {path}: needs a [sweep] table with victims, full_victims and base")
    victims = sweep.get("full_victims" if full else "victims")
    if not isinstance(victims, int) or isinstance(victims, bool) or victims < 1:
        raise ConfigError(f"--sweep {path}: sweep.{'full_victims' if full else 'victims'} must be an integer >= 1, got {victims!r}")
    base = _strings(sweep.get("base", []), f"{path}: sweep.base")
    axes = spec.get("axis")
    if not isinstance(axes, list) or not axes:
        raise ConfigError(f"--sweep {path}: needs at least one [[axis]] table (name, key, values)")
    points = []
    for i, axis in enumerate(axes):
        where = f"{path}: axis {i + 1}"
        if not isinstance(axis, dict) or not all(k in axis for k in ("name", "key", "values")):
            raise ConfigError(f"--sweep {where} needs name, key and values")
        values = axis.get("full_values", axis["values"]) if full else axis["values"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"--sweep {where}: values must be a non-empty list")
        own = _strings(axis.get("set", []), f"{where}: set")
        # An axis may cap its victims (large batches need more distinct sentences than the split has).
        n = min(victims, axis.get("full_victims" if full else "victims", victims))
        for v in values:
            points.append(Point(axis["name"], v, (*base, *own, f"{axis['key']}={_toml(v)}", f"audit.victims={n}")))
        if axis.get("reference"):  # e.g. the no-DP point of the epsilon axis
            points.append(Point(axis["name"], None, (*base, *own, *_strings(axis["reference"], f"{where}: reference"),
                                                     f"audit.victims={n}")))
    for p in points:
        cfg = load_config(config, [*p.overrides, *extra])
        build_attacks(cfg.audit)
        if cfg.dp.mode == "sample":
            from fedpeft.audit.dp import victim_dp

            victim_dp(cfg.dp, cfg.audit.local_steps, cfg.audit.batch_size)
    return SweepSpec(str(sweep.get("name", Path(path).stem)), victims, axes, points, config)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"--sweep {where} must be a list of KEY=VALUE strings, got {value!r}")
    return tuple(value)


def _toml(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def run_sweep(spec: SweepSpec, extra: list[str], on_point: Callable[[int, int, Point], None] | None = None) -> dict[str, Any]:
    """Run every point's audit (main experiment only) and collect the curves."""
    from fedpeft.audit.runner import run_audit
    from fedpeft.validation import load_config

    t0 = time.perf_counter()
    rows = []
    for i, p in enumerate(spec.points):
        if on_point:
            on_point(i, len(spec.points), p)
        cfg = load_config(spec.config, [*p.overrides, *extra])
        result = run_audit(cfg)
        main = result["experiments"][0]
        rows.append({
            "axis": p.axis, "value": p.value, "overrides": list(p.overrides),
            "epsilon": main["dp"]["epsilon"] if main.get("dp") else None,
            "batch_size": main["batch_size"], "rank": cfg.peft.r, "victims": main["victims"],
            "metrics": {f"{a}: {m}": main["attacks"].get(a, {}).get("metrics", {}).get(m) for a, m, _ in CURVES},
            "wall_s": result["wall_s"],
        })
    return {"name": spec.name, "victims": spec.victims, "axes": spec.axes, "points": rows, "wall_s": time.perf_counter() - t0}


def x_value(row: dict[str, Any]) -> float:
    """The x coordinate of a point: its accountant epsilon on the epsilon axis (inf without DP), else its value."""
    if row["axis"] == "epsilon":
        return math.inf if row["epsilon"] is None else float(row["epsilon"])
    return float(row["value"])


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """One panel per axis: each curve with its interval, its baseline dashed."""
    from matplotlib.figure import Figure

    axes = [a["name"] for a in result["axes"]]
    fig = Figure(figsize=(4.2 * len(axes), 3.6), dpi=120, layout="constrained")
    panels = fig.subplots(1, len(axes), squeeze=False)[0]
    colors = ("tab:blue", "tab:orange", "tab:green")
    for ax, spec in zip(panels, result["axes"]):
        rows = [r for r in result["points"] if r["axis"] == spec["name"]]
        finite = [x_value(r) for r in rows if math.isfinite(x_value(r))]
        no_dp_at = max(finite) * 4 if finite else 1.0  # the no-DP point sits right of the largest epsilon
        for (attack, metric, label), color in zip(CURVES, colors):
            pts = sorted(((x_value(r) if math.isfinite(x_value(r)) else no_dp_at), r["metrics"][f"{attack}: {metric}"])
                         for r in rows if r["metrics"].get(f"{attack}: {metric}"))
            if not pts:
                continue
            xs = [x for x, _ in pts]
            mean = [m["attack"]["mean"] for _, m in pts]
            err = [[m["attack"]["mean"] - m["attack"]["lo"] for _, m in pts], [m["attack"]["hi"] - m["attack"]["mean"] for _, m in pts]]
            ax.errorbar(xs, mean, yerr=err, marker="o", ms=4, capsize=3, color=color, label=label)
            ax.plot(xs, [m["baseline"]["mean"] for _, m in pts], ls="--", lw=1, color=color, alpha=0.7)
        ax.set_xlabel(spec.get("label", spec["name"]))
        ax.set_ylim(-0.15, 1.05)  # a noised head inversion can point slightly away (negative cosine)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(finite)), [f"{t:.3g}" for t in sorted(set(finite))])
        if spec["name"] == "epsilon" and any(not math.isfinite(x_value(r)) for r in rows):
            ticks = sorted(set(finite)) + [no_dp_at]
            ax.set_xticks(ticks, [f"{t:.2g}" for t in ticks[:-1]] + ["no DP"])
        ax.set_title(spec.get("title", spec["name"]))
        ax.grid(alpha=0.3)
    panels[0].set_ylabel("attack success (dashed: prior-only baseline)")
    panels[-1].legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def render_sweep(result: dict[str, Any], budget: str) -> str:
    """``audit.md`` of a sweep: the budget, the plot, one table per axis."""
    out = [f"# Audit sweep: {result['name']}", "", budget, "",
           f"Up to {result['victims']} victims per point; wall time {result['wall_s'] / 60:.1f} min. Each cell: attack mean "
           "[bootstrap 95% interval] / prior-only baseline mean.", "", f"![attack success vs epsilon, rank and batch size]({SWEEP_PNG})", ""]
    for spec in result["axes"]:
        out += [f"## {spec.get('title', spec['name'])}", "", f"| {spec.get('label', spec['name'])} | " + " | ".join(c[2] for c in CURVES) + " |",
                "|---" * (len(CURVES) + 1) + "|"]
        for r in (r for r in result["points"] if r["axis"] == spec["name"]):
            x = x_value(r)
            cells = []
            for a, m, _ in CURVES:
                v = r["metrics"].get(f"{a}: {m}")
                cells.append("n/a" if not v else f"{v['attack']['mean']:.3f} [{v['attack']['lo']:.3f}, {v['attack']['hi']:.3f}] / "
                                                 f"{v['baseline']['mean']:.3f}")
            label = "no DP" if not math.isfinite(x) else f"{x:.3g}"
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def write_sweep(result: dict[str, Any], folder: Path, budget: str) -> None:
    """``audit_sweep.json``, ``plots/audit_sweep.png`` and ``audit.md`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SWEEP_JSON).write_text(json.dumps(result, indent=2) + "\n")
    plot_sweep(result, folder / SWEEP_PNG)
    (folder / SWEEP_MD).write_text(render_sweep(result, budget) + "\n")


def budget_line(path: Path) -> str:
    """The sweep file's header comment (its stated budget), as one paragraph."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(x for x in lines if x)
