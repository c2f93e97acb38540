"""Sweeps: one config run over a grid of strategies, data splits and seeds.

A sweep file is an ordinary config (its sections are the base of every run)
plus a ``[sweep]`` table::

    [sweep]
    name = "strategies"
    seeds = [0, 1, 2]
    strategies = ["fedit", "fedex-lora"]
    partitions = ["iid", "dirichlet:0.5", "natural"]    # dirichlet:<alpha>
    epsilons = [inf, 8, 1]                              # optional: DP target epsilons
    full = ["federation.num_rounds=6"]                  # applied with --full

    [sweep.conditions]                                  # optional: named sets of overrides, one column each
    "no faults" = []
    "20% fail" = ["federation.failure_rate=0.2"]

With ``epsilons``, each run sets ``dp.target_epsilon`` (``inf`` = no DP) in
the config's ``dp.mode`` (``"sample"`` if the config has none), and the table
and plot show accuracy against epsilon. With ``conditions``, every run is
repeated under each named set of overrides (faults, hostile clients, ...),
and each condition is a column of the table.

Every run writes its own run folder under ``<out>/<strategy>/<partition>/[eps<e>/][<condition>/]seed<k>``
and is skipped when that folder already has a ``summary.json``, so an
interrupted sweep resumes where it stopped; the run it was in the middle of
continues from its last checkpoint (or starts again when it has none that
fits this run's config). The table (mean ± std over seeds)
and a plot are written at the end.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import parse_override
from fedpeft.validation import config_from_dict
from fedpeft.errors import ConfigError

SWEEP_KEYS = {"name", "seeds", "strategies", "partitions", "epsilons", "conditions", "full", "budget"}


@dataclass(frozen=True)
class SweepRun:
    strategy: str
    partition: str
    seed: int
    overrides: tuple[str, ...]
    epsilon: float | None = None  # the DP target of an epsilon sweep (inf = no DP)
    column: str = ""  # the table column: the partition, or epsilon (and partition) in an epsilon sweep
    condition: str = ""  # the name of its sweep.conditions entry ("" = none)

    @property
    def folder(self) -> Path:
        eps = () if self.epsilon is None else (f"eps{self.epsilon:g}",)
        cond = (condition_folder(self.condition),) if self.condition else ()
        return Path(self.strategy, self.partition, *eps, *cond, f"seed{self.seed}")


def condition_folder(name: str) -> str:
    """A condition's name as a folder name: letters, digits, '-' and '.' (others become '-')."""
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name.replace("%", "pct")).strip("-") or "condition"


def sweep_conditions(sweep: dict) -> dict[str, list[str]]:
    """``sweep.conditions`` checked: names to lists of ``section.key=value`` overrides ({"": []} when absent)."""
    conditions = sweep.get("conditions")
    if conditions is None:
        return {"": []}
    if not isinstance(conditions, dict) or not conditions:
        raise ConfigError("sweep.conditions must be a table of named override lists, e.g. "
                          "{\"no faults\" = [], \"20% fail\" = [\"federation.failure_rate=0.2\"]}")
    folders: dict[str, str] = {}
    for name, overrides in conditions.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"sweep.conditions.{name!r} = {overrides!r}: give a list of \"section.key=value\" strings")
        for text in overrides:
            parse_override(text)
        other = folders.setdefault(condition_folder(name), name)
        if other != name:
            raise ConfigError(f"sweep.conditions {other!r} and {name!r} share the folder name "
                              f"{condition_folder(name)!r}; rename one")
    return {str(k): list(v) for k, v in conditions.items()}


def epsilon_label(epsilon: float) -> str:
    return "ε = ∞" if np.isinf(epsilon) else f"ε = {epsilon:g}"


def epsilon_overrides(epsilon: float, mode: str) -> list[str]:
    """A target epsilon as config overrides; ``inf`` turns DP off."""
    if np.isinf(epsilon):
        return ['dp.mode="none"']
    if not epsilon > 0:
        raise ConfigError(f"sweep.epsilons: {epsilon!r} is not a positive epsilon (use inf for no DP)")
    return [f'dp.mode="{mode if mode != "none" else "sample"}"', f"dp.target_epsilon={float(epsilon)!r}"]


def partition_overrides(spec: str) -> list[str]:
    """``iid`` / ``natural`` / ``dirichlet:<alpha>`` as config overrides."""
    method, _, alpha = spec.partition(":")
    out = [f'data.partition="{method}"']
    if method == "dirichlet":
        if not alpha:
            raise ConfigError(f"sweep.partitions: {spec!r} needs an alpha, e.g. 'dirichlet:0.5'")
        out.append(f"data.alpha={float(alpha)}")
    elif alpha:
        raise ConfigError(f"sweep.partitions: {spec!r}: only dirichlet takes a parameter")
    return out


def load_sweep(path: Path, full: bool = False, extra: list[str] | None = None) -> tuple[dict, list[SweepRun], dict]:
    """The sweep table, its runs, and the base config tables (validated)."""
    try:
        tables = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: {exc}") from None
    sweep = tables.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise ConfigError(f"--config {path}: a sweep file needs a [sweep] table")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"unknown key sweep.{sorted(unknown)[0]}; valid keys in [sweep]: {', '.join(sorted(SWEEP_KEYS))}")
    overrides = list(sweep.get("full", [])) if full else []
    overrides += list(extra or [])
    for text in overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})[key] = value
    runs = []
    partitions = sweep.get("partitions", ["dirichlet:0.5"])
    epsilons = sweep.get("epsilons", [None])
    mode = tables.get("dp", {}).get("mode", "none")
    conditions = sweep_conditions(sweep)
    for strategy in sweep.get("strategies", [tables.get("strategy", {}).get("name", "fedit")]):
        for partition in partitions:
            for epsilon in epsilons:
                dp = [] if epsilon is None else epsilon_overrides(float(epsilon), mode)
                column = partition.replace(":", "-")
                if epsilon is not None:
                    column = epsilon_label(float(epsilon)) + (f" ({column})" if len(partitions) > 1 else "")
                for condition, extra_overrides in conditions.items():
                    label = column if not condition else (condition if len(partitions) == 1 and epsilon is None
                                                           else f"{condition} ({column})")
                    for seed in sweep.get("seeds", [0]):
                        runs.append(SweepRun(strategy, partition.replace(":", "-"), int(seed),
                                             (f'strategy.name="{strategy}"', *partition_overrides(partition), *dp,
                                              *extra_overrides, f"federation.seed={int(seed)}"),
                                             None if epsilon is None else float(epsilon), label, condition))
    for run in runs:  # every run's config must be valid before the first one starts
        run_tables(tables, run)
    return sweep, runs, tables


def run_tables(base: dict, run: SweepRun) -> dict:
    tables = json.loads(json.dumps(base))
    for text in run.overrides:
        section, key, value = parse_override(text)
        tables.setdefault(section, {})[key] = value
    config_from_dict(json.loads(json.dumps(tables)))
    return tables


def _resumable(folder: Path, cfg) -> bool:
    """Whether an unfinished run folder holds a checkpoint of ``cfg`` that this fedpeft can resume.

    Its config must be ``cfg``'s and its last round (if any) intact; a
    folder that fails either is started again rather than stopping the sweep.
    """
    from fedpeft.errors import CheckpointError
    from fedpeft.server.run_folder import RunFolder

    run = RunFolder(folder)
    try:
        if run.checkpoint_config() != json.loads(json.dumps(cfg.to_dict())):
            return False
        run.load_checkpoint()  # the digests and the metrics it needs; None (no round yet) resumes from round 0
    except CheckpointError:
        return False
    return True


def run_sweep(path: Path, out: Path, full: bool = False, extra: list[str] | None = None,
              on_run: Callable[[int, int, SweepRun, dict | None], None] | None = None,
              shard: tuple[int, int] = (0, 1)) -> list[dict[str, Any]]:
    """Run (or resume) every run of the sweep and write ``results.jsonl``, ``table.md`` and a plot.

    ``shard = (k, n)`` runs only every n-th run starting at k, so n processes
    (e.g. with ``--set federation.threads=1`` each) share a machine's cores; the
    table is written once every run of the sweep has a summary.
    """
    from fedpeft.engine import run_engine

    sweep, runs, base = load_sweep(path, full, extra)
    results = []
    k, n = shard
    for i, run in enumerate(runs):
        folder = out / run.folder
        summary_path = folder / "summary.json"
        if summary_path.is_file():  # finished earlier (or by another shard)
            summary = json.loads(summary_path.read_text())
        elif i % n != k:
            continue
        else:
            cfg = config_from_dict(run_tables(base, run))
            resume = folder.exists() and _resumable(folder, cfg)
            if folder.exists() and not resume:  # interrupted before it could be resumed: start it again
                import shutil

                shutil.rmtree(folder)
            if on_run:
                on_run(i, len(runs), run, None)
            summary = run_engine(cfg, folder, resume=resume)
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        errors = [m["aggregation_error"] for m in metrics if m.get("aggregation_error") is not None]
        results.append({
            "strategy": run.strategy, "partition": run.column or run.partition, "seed": run.seed,
            "condition": run.condition or None,
            "target_epsilon": run.epsilon, "epsilon": summary.get("epsilon"),
            "accuracy": summary["final_accuracy"], "bytes": summary["bytes_up"] + summary["bytes_down"],
            "wall_s": summary["wall_s"], "aggregation_error": float(np.mean(errors)) if errors else None,
            "majority_baseline": summary.get("majority_baseline"),
        })
        if on_run:
            on_run(i + 1, len(runs), run, results[-1])
    out.mkdir(parents=True, exist_ok=True)
    if len(results) < len(runs):  # other shards still running
        return results
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    table = summarise(results)
    paired = None if "epsilons" in sweep else paired_differences(results)
    (out / "table.md").write_text(render_table(table, sweep, full, paired))
    baselines = {r["majority_baseline"] for r in results if r.get("majority_baseline") is not None}
    baseline = baselines.pop() if len(baselines) == 1 else None
    if "epsilons" in sweep:
        plot_epsilon_sweep(results, out / "accuracy.png", baseline=baseline)
    else:
        plot_sweep(table, out / "accuracy.png", baseline=baseline,
                   columns="condition" if "conditions" in sweep else "partition")
    return results


def summarise(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean and std over seeds per (strategy, partition)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["strategy"], r["partition"]), []).append(r)
    table = {}
    for key, rows in groups.items():
        acc = np.array([r["accuracy"] for r in rows])
        errs = [r["aggregation_error"] for r in rows if r["aggregation_error"] is not None]
        table[key] = {
            "mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0, "n": len(rows),
            "bytes": float(np.mean([r["bytes"] for r in rows])), "wall_s": float(np.mean([r["wall_s"] for r in rows])),
            "aggregation_error": float(np.mean(errs)) if errs else None,
        }
    return table


def paired_differences(results: list[dict[str, Any]], reference: str | None = None,
                       confidence: float = 0.95) -> dict[tuple[str, str], dict[str, Any]]:
    """Each strategy's accuracy minus the reference strategy's, paired by seed, per partition.

    A seed fixes the partition, the initial adapter and the data order, so
    the paired difference removes what every rule shares (a seed whose split
    is hard for all of them) and keeps what tells the rules apart. A cell is
    ``separated`` when the two-sided Student-t interval of the mean
    difference at ``confidence`` excludes zero (n - 1 degrees of freedom;
    never with fewer than 2 seeds). ``reference`` defaults to the first
    strategy of ``results`` (the sweep's first, FedIT in the shipped sweeps).
    """
    from scipy.stats import t as student_t

    if not results:
        return {}
    reference = reference or results[0]["strategy"]
    acc = {(r["strategy"], r["partition"], r["seed"]): r["accuracy"] for r in results}
    cells: dict[tuple[str, str], list[float]] = {}
    for (strategy, partition, seed), value in acc.items():
        base = acc.get((reference, partition, seed))
        if strategy != reference and base is not None:
            cells.setdefault((strategy, partition), []).append(value - base)
    out = {}
    for key, diffs in cells.items():
        d = np.array(diffs)
        std = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
        half = float(student_t.ppf(0.5 + confidence / 2, len(d) - 1) * std / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[key] = {"mean": float(d.mean()), "std": std, "n": len(d), "half_width": half,
                    "separated": bool(len(d) > 1 and abs(d.mean()) > half), "reference": reference}
    return out


def render_table(table: dict, sweep: dict, full: bool, paired: dict | None = None) -> str:
    from fedpeft.reporting import format_bytes

    strategies = list(dict.fromkeys(k[0] for k in table))
    partitions = list(dict.fromkeys(k[1] for k in table))
    head = "| strategy | " + " | ".join(partitions) + " | bytes / run | wall s / run | aggregation error |"
    lines = [f"# Sweep: {sweep.get('name', 'sweep')}{' (full size)' if full else ''}", "",
             "Test accuracy, mean ± std over seeds; bytes, time and aggregation error averaged over every cell.", "",
             head, "|" + "---|" * (len(partitions) + 4)]
    for s in strategies:
        cells = [f"{table[(s, p)]['mean']:.3f} ± {table[(s, p)]['std']:.3f}" if (s, p) in table else "–" for p in partitions]
        rows = [table[(s, p)] for p in partitions if (s, p) in table]
        errs = [r["aggregation_error"] for r in rows if r["aggregation_error"] is not None]
        error = f"{np.mean(errs):.2e}" if errs else "–"
        lines.append(f"| {s} | " + " | ".join(cells)
                     + f" | {format_bytes(np.mean([r['bytes'] for r in rows]))} | {np.mean([r['wall_s'] for r in rows]):.0f}"
                     + f" | {error} |")
    if paired:
        lines += render_paired(paired, strategies, partitions)
    return "\n".join(lines) + "\n"


def render_paired(paired: dict, strategies: list[str], partitions: list[str]) -> list[str]:
    """The paired-difference table under the accuracy table (see :func:`paired_differences`)."""
    reference = next(iter(paired.values()))["reference"]
    confidence = "95%"
    lines = ["", f"Accuracy minus {reference}'s on the same seed (same split, initialisation and data order), "
             f"mean ± std over seeds; ✓ where the {confidence} t-interval of the mean excludes zero.", "",
             "| strategy | " + " | ".join(partitions) + " |", "|" + "---|" * (len(partitions) + 1)]
    for s in strategies:
        if s == reference:
            continue
        cells = []
        for p in partitions:
            c = paired.get((s, p))
            if c is None:
                cells.append("–")
            elif c["n"] < 2:  # one seed: a difference, no spread
                cells.append(f"{c['mean']:+.3f}")
            else:
                cells.append(f"{c['mean']:+.3f} ± {c['std']:.3f}{' ✓' if c['separated'] else ''}")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def plot_sweep(table: dict, path: Path, baseline: float | None = None, columns: str = "partition") -> None:
    """Accuracy bars per strategy, one per table column (``columns`` names what they are: partition or condition)."""
    from matplotlib.figure import Figure

    strategies = list(dict.fromkeys(k[0] for k in table))
    partitions = list(dict.fromkeys(k[1] for k in table))
    fig = Figure(figsize=(max(6, 1.2 * len(strategies) + 2), 4), dpi=120)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(partitions))
    for j, p in enumerate(partitions):
        xs = [i + j * width for i, s in enumerate(strategies) if (s, p) in table]
        ys = [table[(s, p)]["mean"] for s in strategies if (s, p) in table]
        es = [table[(s, p)]["std"] for s in strategies if (s, p) in table]
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(strategies))], strategies, rotation=30, ha="right")
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="majority class")
    ax.set_ylabel("test accuracy")
    lo = min(v["mean"] - v["std"] for v in table.values())
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend(title=columns, fontsize=8)
    what = "data split" if columns == "partition" else columns
    ax.set_title(f"Accuracy by aggregation rule and {what} (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_epsilon_sweep(results: list[dict[str, Any]], path: Path, baseline: float | None = None) -> None:
    """Accuracy against the target epsilon, one line per strategy (mean ± std over seeds).

    Epsilon is on a log axis; the non-private runs (``inf``) sit at the right
    edge, marked "∞", so the cost of privacy reads off as the drop to each point.
    """
    from matplotlib.figure import Figure

    finite = sorted({r["target_epsilon"] for r in results if not np.isinf(r["target_epsilon"])})
    inf_x = finite[-1] * 2.5 if finite else 1.0
    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.add_subplot()
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        points = {}
        for r in results:
            if r["strategy"] == strategy:
                x = inf_x if np.isinf(r["target_epsilon"]) else r["target_epsilon"]
                points.setdefault(x, []).append(r["accuracy"])
        xs = sorted(points)
        means = [float(np.mean(points[x])) for x in xs]
        stds = [float(np.std(points[x], ddof=1)) if len(points[x]) > 1 else 0.0 for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=strategy)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="majority class")
    ax.set_xscale("log")
    ax.set_xticks(finite + [inf_x], [f"{e:g}" for e in finite] + ["∞"])
    ax.minorticks_off()
    ax.set_xlabel("target ε (δ and unit from the config)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy against differential-privacy budget (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)
