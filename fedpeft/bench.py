"""Performance benchmarks: ratios measured side by side in one process.

Each benchmark returns a dict of raw timings plus the ratio that matters, so
the numbers compare like with like on whatever machine runs them.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpeft.config import Config, load_config


def _best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock timings (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_resident_model(cfg: Config, repeats: int = 3) -> dict[str, float]:
    """Swapping an adapter payload into the resident model vs rebuilding the model.

    This is the cost fedpeft's clients avoid every round by keeping the base
    model resident (DESIGN.md, "Principles").
    """
    from fedpeft.models.registry import get_model_spec
    from fedpeft.models.resident import load_resident_model
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    payload = rt.model.payload()
    swap = _best_of(lambda: rt.model.set_payload(payload), repeats * 10)
    rebuild = _best_of(lambda: load_resident_model(cfg, rt.data.num_labels), repeats)
    return {
        "model": get_model_spec(cfg.model.name).name,
        "adapter_swap_s": swap,
        "model_rebuild_s": rebuild,
        "rebuild_over_swap": rebuild / swap,
    }


def bench_payload_bytes(cfg: Config) -> dict[str, float]:
    """Bytes one client sends per round with LoRA vs full fine-tuning (float32)."""
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    lora = rt.model.payload().nbytes
    full = rt.model.full_model_nbytes()
    return {"lora_payload_bytes": lora, "full_model_bytes": full, "full_over_lora": full / lora}


BENCHMARKS: dict[str, Callable[[Config], dict[str, float]]] = {
    "resident_model": bench_resident_model,
    "payload_bytes": bench_payload_bytes,
}


def run_benchmarks(names: list[str] | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(None, overrides or [])
    selected = names or list(BENCHMARKS)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "benchmarks": {},
    }
    for name in selected:
        results["benchmarks"][name] = BENCHMARKS[name](cfg)
    return results


def write_results(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
