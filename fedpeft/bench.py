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

from fedpeft.config import Config
from fedpeft.validation import load_config


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
    from fedpeft.runtime import resident_spec
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    payload = rt.model.payload()
    swap = _best_of(lambda: rt.model.set_payload(payload), repeats * 10)
    rebuild = _best_of(lambda: load_resident_model(resident_spec(cfg, rt.data.num_labels)), repeats)
    return {
        "model": get_model_spec(cfg.model.name, cfg.model.task).name,
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


def bench_dp_step(cfg: Config, repeats: int = 5) -> dict[str, float]:
    """One DP-SGD step (opacus per-sample gradients, clipping, noise) over one plain step, same batch.

    Both steps run the same loss on the same ``train.batch_size`` examples
    with AdamW at lr 0 (the model does not drift between repeats); the plain
    step is timed before and after the DP one, its best kept.
    """
    import torch

    from fedpeft.privacy.dp_sgd import DPSGD, dp_optimizer, grad_sample_module, per_sample_loss
    from fedpeft.runtime import runtime

    rt = runtime(cfg)
    split, _ = rt.splits
    shard = rt.shards[0]
    size = min(cfg.train.batch_size, len(shard))
    batch = split.batch(shard[:size], rt.model.task)
    model = rt.model.model
    params = [p for p in model.parameters() if p.requires_grad]

    def step(forward, optimizer):
        optimizer.zero_grad(set_to_none=True)
        loss = per_sample_loss(forward(batch["input_ids"], batch["attention_mask"]), batch, rt.model.task).mean()
        loss.backward()
        optimizer.step()

    def logits(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    model.train()
    plain_opt = torch.optim.AdamW(params, lr=0.0)
    plain = _best_of(lambda: step(logits, plain_opt), repeats)
    with grad_sample_module(model) as gsm:
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=cfg.dp.max_grad_norm or 1.0, sample_rate=size / len(shard))
        private_opt = dp_optimizer(torch.optim.AdamW(params, lr=0.0), dp, size, torch.Generator().manual_seed(0))
        private = _best_of(lambda: step(gsm, private_opt), repeats)
    plain = min(plain, _best_of(lambda: step(logits, plain_opt), repeats))
    model.eval()
    return {"batch_size": size, "plain_step_s": plain, "dp_step_s": private, "dp_over_plain": private / plain}


SCALE_WORKLOAD = ('data.partition="iid"', "federation.clients_per_round=10", "federation.num_rounds=3",
                  "train.local_steps=2", "data.max_test_examples=200", "federation.client_eval=false")
"""The scale benchmark's federation on top of the given config: a systems test, not a learning one."""


def bench_scale(cfg: Config, sizes: tuple[int, ...] = (100, 1000, 10000)) -> dict[str, float]:
    """Start-up, time per round and peak memory of federations of ``sizes`` clients, one fresh process each.

    Each size runs ``cfg`` (its engine included) with :data:`SCALE_WORKLOAD`
    and ``federation.num_clients = N`` in a new Python process, so that
    nothing is cached between sizes and the memory is that one run's:

    * ``clients_{N}_startup_s``: from the process's start to the end of
      round 0 (data, shards, DP plan, Ray, nodes, models, first evaluation);
    * ``clients_{N}_round_s``: mean wall time of the rounds after round 0;
    * ``clients_{N}_peak_rss_mb``: the largest total resident memory of the
      process and all its descendants (Ray's raylet, GCS and workers
      included), sampled every 0.2 s with psutil;
    * ``clients_{N}_startup_cpu_s`` and ``clients_{N}_round_cpu_s``: the
      same two phases in CPU seconds of that process tree (to the nearest
      sample), which a machine shared with other jobs stretches far less
      than wall time.

    With virtual clients (``federation.num_nodes``) all three should stay
    flat as ``N`` grows.
    """
    import subprocess
    import sys
    import tempfile

    import psutil

    results: dict[str, float] = {}
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"fedpeft-scale-{n}-") as tmp:
            tables = load_config(cfg, [*SCALE_WORKLOAD, f"federation.num_clients={n}"]).to_dict()
            child = subprocess.Popen([sys.executable, "-c", "from fedpeft.bench import _scale_run; _scale_run()", tmp],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            child.stdin.write(json.dumps(tables))
            child.stdin.close()
            started = psutil.Process(child.pid).create_time()
            peak, samples = 0, []  # (wall time, CPU seconds of the tree so far)
            while child.poll() is None:
                rss, cpu = _tree_usage(child.pid)
                peak = max(peak, rss)
                samples.append((time.time(), cpu))
                time.sleep(0.2)
            stdout, stderr = child.stdout.read(), child.stderr.read()
            if child.returncode != 0:
                raise RuntimeError(f"the {n}-client scale run failed (exit {child.returncode}): {stderr[-2000:]}")
            ends = json.loads(stdout.strip().splitlines()[-1])["round_ends"]
        results[f"clients_{n}_startup_s"] = ends[0] - started
        results[f"clients_{n}_round_s"] = (ends[-1] - ends[0]) / (len(ends) - 1)
        results[f"clients_{n}_peak_rss_mb"] = peak / 2**20
        cpu_at = [_cpu_at(samples, t) for t in ends]
        results[f"clients_{n}_startup_cpu_s"] = cpu_at[0]
        results[f"clients_{n}_round_cpu_s"] = (cpu_at[-1] - cpu_at[0]) / (len(ends) - 1)
    return results


def _cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The tree's CPU seconds at the first sample taken at or after ``when`` (the last one if none)."""
    return next((cpu for t, cpu in samples if t >= when), samples[-1][1])


def _tree_usage(pid: int) -> tuple[int, float]:
    """Resident bytes and CPU seconds (user + system) of process ``pid`` and its descendants now."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0.0
    rss, cpu = 0, 0.0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            times = proc.cpu_times()
            cpu += times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return rss, cpu


def _scale_run() -> None:
    """One :func:`bench_scale` run: the config's tables on stdin, the run folder in argv; prints the round ends."""
    import sys

    from fedpeft.engine import run_engine
    from fedpeft.validation import config_from_dict

    cfg = config_from_dict(json.loads(sys.stdin.read()))
    ends: list[float] = []
    run_engine(cfg, Path(sys.argv[1]) / "run", on_round=lambda line: ends.append(time.time()))
    print(json.dumps({"round_ends": ends}))


BENCHMARKS: dict[str, Callable[[Config], dict[str, float]]] = {
    "resident_model": bench_resident_model,
    "payload_bytes": bench_payload_bytes,
    "dp_step": bench_dp_step,
    "scale": bench_scale,
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
