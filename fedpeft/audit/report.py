"""Write an audit's ``audit.json`` and ``audit.md``.

The markdown puts the threat model first, then the settings, one table per
experiment and attack (each metric beside its prior-only baseline, both with
bootstrap 95% intervals over victims), recovery by sentence length, the
findings the studies show, and recovered texts with the recovered wordpieces
in bold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"


def _ci(d: dict) -> str:
    if d.get("n", 0) == 0 or math.isnan(d["mean"]):
        return "n/a"
    return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def findings(result: dict[str, Any]) -> list[str]:
    """One line per study, comparing the span attack's recall with the main experiment."""
    key = ("lora-span", "token recall")
    by_name = {e["name"]: e for e in result["experiments"] if "attacks" in e}

    def recall(e):
        m = e["attacks"].get(key[0], {}).get("metrics", {}).get(key[1])
        return None if m is None else m["attack"]

    main = by_name.get("main")
    base = recall(main) if main else None
    lines = []
    for name, e in by_name.items():
        if name == "main":
            continue
        r = recall(e)
        if r is None or base is None:
            continue
        lines.append(f"- **{e['description']}**: span-attack token recall {_ci(r)} (main: {_ci(base)}).")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    out = ["# Privacy audit", "", "## Threat model", "", result["threat_model"], "", "## Settings", ""]
    out += [
        f"- model `{s['model']}`, LoRA rank {s['rank']}, strategy `{s['strategy']}`, DP `{s['dp']}`",
        f"- round {s['round']} ({s['regime']}), learning rate {s['lr']}, victims per experiment {s['victims']}",
        f"- attacks: {', '.join(s['attacks'])}",
        f"- victims' data: {s['victim_texts'] or 'unseen sentences of the test split'}"
        + (f", at most {s['max_victim_tokens']} tokens" if s["max_victim_tokens"] else ""),
        f"- wall time {result['wall_s']:.0f} s",
        "",
        "Every number is a mean over victims with a bootstrap 95% interval. The baseline is what the server "
        "guesses from its public prior alone: the majority label (label counts from the label prior for batches), "
        "the mean public head input, and the most frequent public tokens (as many as the victim has). "
        "Token scores leave out special tokens; an attack that recovers nothing has precision 0.",
        "",
    ]
    for e in result["experiments"]:
        out += [f"## Experiment: {e['name']}", "",
                f"{e['description']}: batch {e['batch_size']}, {e['local_steps']} local step(s) ({e['optimizer']}), dropout {e['dropout']:g}.", ""]
        if "skipped" in e:
            out += [f"Skipped: {e['skipped']}.", ""]
            continue
        for attack, tab in e["attacks"].items():
            if "skipped" in tab:
                out += [f"**{attack}**: not applicable ({tab['skipped']}).", ""]
                continue
            out += [f"**{attack}** ({tab['seconds_per_victim']:.2f} s per victim)", "", "| metric | attack | baseline |", "|---|---|---|"]
            out += [f"| {m} | {_ci(v['attack'])} | {_ci(v['baseline'])} |" for m, v in tab["metrics"].items()]
            out.append("")
        if e["name"] == "main" and e["by_length"]:
            out += ["Span-attack token recall by the victim's token count (specials included):", "",
                    "| tokens | victims | recall |", "|---|---|---|"]
            out += [f"| {b['tokens']} | {b['victims']} | {_ci(b['recall'])} |" for b in e["by_length"]]
            out.append("")
        if e["examples"]:
            out += ["Recovered texts (recovered wordpieces in **bold**):", ""]
            out += [f"- {x['marked']}" for x in e["examples"]]
            out.append("")
    lines = findings(result)
    if lines:
        out += ["## Findings", ""] + lines + [""]
    return "\n".join(out)


def write_report(result: dict[str, Any], folder: Path) -> None:
    """Write ``audit.json`` and ``audit.md`` into ``folder`` (created if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / AUDIT_JSON).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    (folder / AUDIT_MD).write_text(render_markdown(result) + "\n")


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
