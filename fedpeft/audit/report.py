"""Write an audit's ``audit.json`` and ``audit.md``.

The markdown puts the threat model first, then the settings, one table per
experiment and attack (each metric beside its prior-only baseline, both with
bootstrap 95% intervals over victims), recovery by sentence length, the
findings the studies show, and recovered texts with the recovered wordpieces
in bold. With image attacks an "Images" section follows: a table per attack
and ``images.png``, the victims' originals above each attack's reconstructions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

AUDIT_JSON = "audit.json"
AUDIT_MD = "audit.md"
IMAGE_GRID = "images.png"


def _ci(d: dict) -> str:
    if d.get("n", 0) == 0 or math.isnan(d["mean"]):
        return "n/a"
    return f"{d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _recall(e: dict) -> dict | None:
    m = e.get("attacks", {}).get("lora-span", {}).get("metrics", {}).get("token recall")
    return None if m is None else m["attack"]


def findings(result: dict[str, Any]) -> list[str]:
    """One line per study: the span attack's token recall along the varied setting, from the positive control on."""
    exps = result["experiments"]
    control = next((e for e in exps if e["name"] == "positive control"), None)
    lines = []
    if control is not None and _recall(control) is not None:
        lines.append(f"- **positive control** ({control['description']}): span-attack token recall {_ci(_recall(control))}.")
    studies: dict[str, list[dict]] = {}
    for e in exps:
        if e.get("study"):
            studies.setdefault(e["study"], []).append(e)
    for study, group in studies.items():
        parts = []
        for e in group:
            if "skipped" in e:
                parts.append(f"{e['name']}: skipped ({e['skipped']})")
            elif _recall(e) is not None:
                parts.append(f"{e['name']}: {_ci(_recall(e))}")
        if parts:
            lines.append(f"- **{study}** (span-attack token recall): " + "; ".join(parts) + ".")
    main = next((e for e in exps if e["name"] == "main" and "attacks" in e), None)
    if main is not None and _recall(main) is not None:
        lines.append(f"- **main** ({main['description']}): span-attack token recall {_ci(_recall(main))}.")
    return lines


def _eps(x: float) -> str:
    return "inf (no noise)" if math.isinf(x) else f"{x:.3g}"


def empirical_section(emp: dict[str, Any]) -> list[str]:
    """The canary audit: the empirical lower bound beside the accountant's epsilon."""
    verdict = ("**violation: the lower bound exceeds the accountant's epsilon, a DP bug**"
               if emp["epsilon_lower"] > emp["epsilon_accountant"] else "consistent (lower bound <= accountant)")
    return [
        "## Empirical privacy (canary audit)", "",
        f"{emp['unit']}-level, {emp['details']}; sigma = {emp['noise_multiplier']:.4g}, C = {emp['clipping_norm']:g}, "
        f"{emp['trials']} trials with the canary and {emp['trials']} without (half choose the threshold, half measure).", "",
        "| unit | empirical epsilon lower bound | accountant epsilon | delta | confidence | FP / FN (held-out half) |",
        "|---|---|---|---|---|---|",
        f"| {emp['unit']} | {emp['epsilon_lower']:.3f} | {_eps(emp['epsilon_accountant'])} ({emp['accountant']}) | {emp['delta']:g} | "
        f"{emp['confidence']:g} | {emp['false_pos']} / {emp['false_neg']} |", "",
        f"Verdict: {verdict}. The adversary: {emp.get('adversary', 'the canary test')}; it chose the test "
        f"\"{emp.get('test', 'score')}\". The lower bound is Clopper-Pearson on that test's FPR and FNR; "
        f"with {emp['trials'] - emp['trials'] // 2} held-out trials per side it cannot exceed "
        f"{emp['max_lower']:.2f} (the ceiling) however weak the protection (more trials: `audit.canary_trials`).", "",
    ] + ([] if emp.get("has_power", True) else [
        f"**No power:** the ceiling {emp['max_lower']:.2f} is at or below the accountant's epsilon, so these trials "
        "could not show a violation; raise `audit.canary_trials`.", ""])


def images_section(img: dict[str, Any]) -> list[str]:
    """The image experiment: one table per attack beside the prior-only baseline, and the grid."""
    out = ["## Images", "", f"The threat model above, applied to images: {img['description']}.", ""]
    if img.get("dp"):
        out += [f"DP: {img['dp']['describe']}.", ""]
    out += ["The baseline is the public mean image (PSNR, SSIM) and the label prior (majority label; its counts for batches). "
            "PSNR and SSIM are per image after the best matching of reconstructions to originals; intervals are "
            "bootstrap 95% over images.", ""]
    for attack, tab in img["attacks"].items():
        out += [f"**{attack}** ({tab['seconds_per_victim']:.2f} s per victim)", "", "| metric | attack | baseline |", "|---|---|---|"]
        out += [f"| {m} | {_ci(v['attack'])} | {_ci(v['baseline'])} |" for m, v in tab["metrics"].items()]
        out.append("")
    shown = len(img["grid"].get("originals", []))
    out += [f"![originals (top row) and reconstructions]({IMAGE_GRID})", "",
            f"[{IMAGE_GRID}]({IMAGE_GRID}): the first {shown} victim images (top row) and each attack's reconstruction below.", ""]
    return out


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    out = ["# Privacy audit", "", "## Threat model", "", result["threat_model"], "", "## Settings", ""]
    out += [
        f"- model `{s['model']}`, LoRA rank {s['rank']}, strategy `{s['strategy']}`, DP `{s['dp']}`",
        f"- round {s['round']} ({s['regime']}), learning rate {s['lr']}, victims {s['victims']} (main, positive control), {s.get('study_victims', s['victims'])} per study",
        f"- attacks: {', '.join(s['attacks'])}",
        f"- victims' data: {s['victim_texts'] or 'unseen sentences of the test split'}"
        + (f", at most {s['max_victim_tokens']} tokens" if s["max_victim_tokens"] else ""),
        f"- wall time {result['wall_s']:.0f} s",
        *([f"- DP: {s['dp_note']}"] if s.get("dp_note") else []),
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
        out += [f"{e['victims']} victims." + (f" DP: {e['dp']['describe']}." if e.get("dp") else ""), ""]
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
    if result.get("images"):
        out += images_section(result["images"])
    if result.get("empirical"):
        out += empirical_section(result["empirical"])
    return "\n".join(out)


def write_report(result: dict[str, Any], folder: Path) -> None:
    """Write ``audit.json``, ``audit.md`` and (with image attacks) ``images.png`` into ``folder`` (created if absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    if result.get("images"):
        from fedpeft.audit.image_grid import write_image_grid

        write_image_grid(folder / IMAGE_GRID, result["images"]["grid"])
    (folder / AUDIT_JSON).write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    (folder / AUDIT_MD).write_text(render_markdown(result) + "\n")


def _jsonable(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
