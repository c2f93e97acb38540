"""``report.md``: a finished run's settings, results, rounds and plots in Markdown."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpeft.reporting._run import config_value, dp_unit, partition_label, pick, rounds_trained
from fedpeft.reporting.console import (
    MISSING,
    failed_clients,
    format_bytes,
    format_duration,
    format_float,
    format_percent,
    has_values,
)

Metrics = Sequence[Mapping[str, Any]]

# (file name under plots/, alt text), in the order they appear in the report.
PLOTS = (
    ("accuracy.png", "Test accuracy and loss per round"),
    ("bytes.png", "Cumulative bytes up and down vs full fine-tuning"),
    ("epsilon.png", "Differential-privacy epsilon per round"),
)


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read ``summary.json`` and ``metrics.jsonl`` from a run folder.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.

    Returns
    -------
    summary : dict
    metrics : list of dict
        One dict per non-empty line of ``metrics.jsonl``, in file order.
    """
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return summary, [json.loads(line) for line in lines if line.strip()]


def _cell(value: Any) -> str:
    """Make ``value`` safe inside a Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> list[str]:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fmt_number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _settings(summary: Mapping[str, Any]) -> str:
    """One short paragraph; every clause is left out when its values are unknown."""
    sentences: list[str] = []

    model = pick(summary, "model", "model.name")
    dataset = pick(summary, "dataset", "data.dataset")
    subject = []
    if model is not None:
        subject.append(f"Model **{model}**")
    if dataset is not None:
        subject.append(f"fine-tuned on **{dataset}**" if subject else f"Dataset **{dataset}**")
    clause = [" ".join(subject)] if subject else []
    partition = partition_label(summary)
    num_clients = pick(summary, "num_clients", "federation.num_clients")
    if partition is not None or num_clients is not None:
        split = ["split"] + ([partition] if partition is not None else [])
        if num_clients is not None:
            split.append(f"over {num_clients} clients")
        clause.append(" ".join(split))
    per_round = pick(summary, "clients_per_round", "federation.clients_per_round")
    if per_round is not None:
        clause.append(f"{per_round} sampled per round")
    num_rounds = pick(summary, "num_rounds", "federation.num_rounds")
    if num_rounds is not None:
        clause.append(f"for {num_rounds} rounds")
    if clause:
        sentences.append(", ".join(clause) + ".")

    clause = []
    strategy = pick(summary, "strategy", "strategy.name")
    if strategy is not None:
        params = summary.get("strategy_params")
        if params is None:
            params = {k: v for k, v in (config_value(summary, "strategy") or {}).items() if k != "name"}
        extra = f" ({', '.join(f'{k} = {_fmt_number(v)}' for k, v in params.items())})" if params else ""
        clause.append(f"Strategy **{strategy}**{extra}")
    method = config_value(summary, "peft.method", "lora")
    rank = config_value(summary, "peft.r")
    if rank is not None:
        name = "LoRA" if str(method).lower() == "lora" else str(method)
        lora_alpha = config_value(summary, "peft.alpha")
        clause.append(f"{name} r = {rank}" + (f", alpha = {_fmt_number(lora_alpha)}" if lora_alpha is not None else ""))
    steps = config_value(summary, "train.local_steps")
    batch = config_value(summary, "train.batch_size")
    lr = config_value(summary, "train.lr")
    if steps is not None or lr is not None:
        text = f"{steps} local steps per round" if steps is not None else "local training"
        if batch is not None:
            text += f" of batch {batch}"
        if lr is not None:
            text += f" at lr {_fmt_number(lr)}"
        clause.append(text)
    if clause:
        sentences.append("; ".join(clause) + ".")

    unit = dp_unit(summary)
    if unit is None:
        if "epsilon" in summary or config_value(summary, "dp.mode") is not None:
            sentences.append("DP: none.")
    else:
        dp = [unit]
        block = summary.get("dp") or {}
        for key, label in (("noise_multiplier", "noise multiplier"), ("max_grad_norm", "clipping norm"),
                           ("target_epsilon", "target ε")):
            value = block.get(key, config_value(summary, f"dp.{key}"))
            if value:
                dp.append(f"{label} {_fmt_number(value)}")
        sentences.append(f"DP: {', '.join(dp)}.")

    seed, machine = summary.get("seed"), summary.get("machine")
    if seed is not None or machine:
        run = "Seed " + str(seed) if seed is not None else "Ran"
        sentences.append(run + (f" on {machine}." if machine else "."))
    return " ".join(sentences)


def privacy_line(summary: Mapping[str, Any]) -> str:
    """One sentence naming epsilon, delta, the protected unit and the accountant.

    Parameters
    ----------
    summary : mapping
        The run's ``summary.json``.

    Returns
    -------
    str
        E.g. ``"(ε = 3.21, δ = 1e-05)-DP, sample-level, accountant rdp."`` or
        ``"No differential privacy: ε = ∞."``.
    """
    epsilon = summary.get("epsilon")
    unit = dp_unit(summary)
    if epsilon is None:
        if unit is None:
            return "No differential privacy: ε = ∞."
        return f"Differential privacy ({unit}) was on, but no ε was recorded."
    delta = pick(summary, "delta", "dp.delta")
    text = f"(ε = {epsilon:.2f}, δ = {delta:g})-DP" if delta is not None else f"ε = {epsilon:.2f} (δ not recorded)"
    if unit:
        text += f", {unit}"
    accountant = pick(summary, "accountant", "dp.accountant")
    if accountant:
        text += f", accountant {accountant}"
    return text + "."


def _results(summary: Mapping[str, Any], metrics: Metrics) -> list[list[str]]:
    rows: list[list[str]] = []
    acc, base = summary.get("final_accuracy"), summary.get("majority_baseline")
    if acc is not None:
        text = format_percent(acc)
        if base is not None:
            text += f" ({100 * (acc - base):+.2f} points over the baseline)"
        rows.append(["Final test accuracy", text])
    if base is not None:
        rows.append(["Majority-class baseline", format_percent(base)])
    if summary.get("final_client_accuracy") is not None:
        rows.append(["Mean client accuracy on own training shard", format_percent(summary["final_client_accuracy"])])
    if metrics and metrics[-1].get("aggregation_error") is not None:
        rows.append(["Aggregation error (last round, vs exact mean update)", f"{metrics[-1]['aggregation_error']:.2e}"])
    if summary.get("final_loss") is not None:
        rows.append(["Final test loss", format_float(summary["final_loss"])])
    perplexity = summary.get("final_perplexity")
    if perplexity is None and metrics:
        perplexity = metrics[-1].get("perplexity")
    if perplexity is not None:
        rows.append(["Final perplexity", f"{perplexity:.2f}"])
    if summary.get("wall_s") is not None:
        rows.append(["Wall time", format_duration(summary["wall_s"])])

    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    if trainable is not None and total:
        rows.append(["Trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.3g}%)"])
    elif trainable is not None:
        rows.append(["Trainable parameters", f"{trainable:,}"])

    up, down = summary.get("bytes_up"), summary.get("bytes_down")
    if up is not None:
        rows.append(["Bytes up (clients → server)", format_bytes(up)])
    if down is not None:
        rows.append(["Bytes down (server → clients)", format_bytes(down)])
    per_round = summary.get("full_finetune_bytes_per_round")
    rounds = rounds_trained(summary, metrics)
    if per_round and rounds:
        full = per_round * rounds
        rows.append(["Full fine-tuning would send (up + down)",
                     f"{format_bytes(full)} ({rounds} round{'s' if rounds != 1 else ''} × {format_bytes(per_round)})"])
        if up is not None and down is not None:
            sent = up + down
            ratio = sent / full
            times = ""
            if sent:
                # Dense residuals (FedEx-LoRA style) can make the adapter cost more than full fine-tuning.
                factor, word = (full / sent, "fewer") if sent <= full else (sent / full, "more")
                times = f", {factor:,.{1 if factor < 10 else 0}f}× {word} bytes"
            rows.append(["Bytes sent vs full fine-tuning", f"{100 * ratio:.3g}% ({format_bytes(sent)}{times})"])
    return rows


def _rounds(metrics: Metrics) -> list[str]:
    columns: list[tuple[str, Any]] = [("Round", lambda m: m.get("round", MISSING))]
    optional = [
        ("accuracy", "Accuracy", lambda m: format_percent(m.get("accuracy"))),
        ("loss", "Loss", lambda m: format_float(m.get("loss"))),
        ("train_loss", "Train loss", lambda m: format_float(m.get("train_loss"))),
        ("perplexity", "Perplexity", lambda m: format_float(m.get("perplexity"), 2)),
        ("bytes_up", "Bytes up", lambda m: format_bytes(m.get("bytes_up"))),
        ("bytes_down", "Bytes down", lambda m: format_bytes(m.get("bytes_down"))),
        ("epsilon", "ε", lambda m: format_float(m.get("epsilon"), 2)),
        ("wall_s", "Time", lambda m: format_duration(m.get("wall_s"))),
    ]
    columns += [(title, fn) for key, title, fn in optional if has_values(metrics, key)]
    align = ["--:"] * len(columns)
    if any(failed_clients(m) for m in metrics):
        columns.append(("Failed clients", lambda m: ", ".join(str(f.get("client", "?")) for f in failed_clients(m))))
        align.append("---")
    rows = [[fn(m) for _, fn in columns] for m in metrics]
    return _table([title for title, _ in columns], rows, align)


def _privacy_section(dp: Mapping[str, Any] | None) -> list[str]:
    """The ``dp`` block of the summary as a table: every number with its unit, accountant and delta."""
    if not dp:
        return []
    unit = "one training example" if dp.get("unit") == "sample" else "one client (all its data)"
    rows = [
        ["Protected unit", f"{unit}; neighbouring datasets: {dp.get('relation', MISSING)}"],
        ["Mechanism", dp.get("mechanism", MISSING)],
        ["Accountant", dp.get("accountant", MISSING)],
        ["Randomness", dp.get("randomness", MISSING)],
        ["δ", f"{dp['delta']:g}"],
        ["Noise multiplier σ" + (" (calibrated)" if dp.get("target_epsilon") else ""), f"{dp['noise_multiplier']:.4g}"],
        ["Clipping norm C", f"{dp['max_grad_norm']:g}"],
        ["Sampling", f"{dp.get('sampling', MISSING)}, rate {dp['sample_rate']:.4g}"],
        ["Steps" if dp.get("unit") == "sample" else "Rounds", f"{dp['steps']}"],
        ["ε (largest over clients)", f"{dp['epsilon']:.3f}"],
    ]
    if dp.get("target_epsilon"):
        rows.append(["Target ε", f"{dp['target_epsilon']:g}"])
    if dp.get("noised_arrays"):
        rows.append(["Noised arrays", f"{len(dp['noised_arrays'])} (the ones clients train and upload)"])
    lines = ["## Differential privacy", ""] + _table(["", "Value"], rows, ["---", "---"]) + [""]
    per_client = dp.get("epsilon_per_client") or {}
    if dp.get("unit") == "sample" and per_client:
        steps = dp.get("steps_per_client", {})
        rates = dp.get("sample_rate_per_client", {})
        lines += ["Each client's own accountant (it only spends when it trains):", ""]
        lines += _table(["Client", "DP-SGD steps", "q", "ε"],
                        [[c, steps.get(c, MISSING), f"{rates[c]:.4g}" if c in rates else MISSING, f"{e:.3f}"]
                         for c, e in per_client.items()], ["--:", "--:", "--:", "--:"]) + [""]
    return lines


def write_report(run_dir: str | Path, summary: Mapping[str, Any], metrics: Metrics) -> Path:
    """Write ``run_dir/report.md``.

    Plots are linked only if their files already exist under ``run_dir/plots``,
    so call :func:`fedpeft.reporting.write_plots` first.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    summary : mapping
        The run's ``summary.json``.
    metrics : sequence of mapping
        The lines of ``metrics.jsonl``; round 0 is the evaluation before training.

    Returns
    -------
    Path
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    lines = [f"# {summary.get('name') or run_dir.name}", ""]
    settings = _settings(summary)
    if settings:
        lines += ["## Settings", "", settings, ""]

    results = _results(summary, metrics)
    lines += ["## Results", ""]
    if results:
        lines += _table(["", "Value"], results, ["---", "---"]) + [""]
    lines += [f"**Privacy:** {privacy_line(summary)}", ""]
    lines += _privacy_section(summary.get("dp"))

    if metrics:
        lines += ["## Rounds", "", "Round 0 is the evaluation before training.", ""]
        lines += _rounds(metrics) + [""]

    failures = [(m.get("round", MISSING), f) for m in metrics for f in failed_clients(m)]
    if failures:
        lines += ["## Failed or rejected clients", ""]
        lines += _table(["Round", "Client", "Reason"],
                        [[r, f.get("client", MISSING), f.get("reason") or MISSING] for r, f in failures],
                        ["--:", "---", "---"]) + [""]

    plots = [(name, alt) for name, alt in PLOTS if (run_dir / "plots" / name).is_file()]
    if plots:
        lines += ["## Plots", ""]
        for name, alt in plots:
            lines += [f"![{alt}](plots/{name})", ""]

    path = run_dir / "report.md"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
