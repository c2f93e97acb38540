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
    batch = split.batch(shard[:size], rt.model.task, rt.model.device)
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
        private_opt = dp_optimizer(torch.optim.AdamW(params, lr=0.0), dp, size,
                                   torch.Generator(rt.model.device).manual_seed(0))
        private = _best_of(lambda: step(gsm, private_opt), repeats)
    plain = min(plain, _best_of(lambda: step(logits, plain_opt), repeats))
    model.eval()
    return {"batch_size": size, "plain_step_s": plain, "dp_step_s": private, "dp_over_plain": private / plain}


def bench_batched(cfg: Config, clients: int = 8, steps: int = 3) -> dict[str, float]:
    """``clients`` clients' local steps trained together (the batched engine) vs one after another.

    Both train the same clients from the same payload for ``steps`` steps of
    ``train.batch_size`` with dropout off (the batched path needs it off);
    each is timed after one untimed warm-up step. The ratio is clients x steps
    per second, batched over sequential.
    """
    from fedpeft.runtime import runtime
    from fedpeft.training import train_steps
    from fedpeft.training.batched import train_clients_batched

    cfg = load_config(cfg, ["model.dropout=0.0", "peft.dropout=0.0"])
    rt = runtime(cfg)
    split, _ = rt.splits
    shards = [rt.shards[k % len(rt.shards)] for k in range(clients)]
    seeds = list(range(clients))
    payload = rt.model.initial
    t = cfg.train
    kw = dict(task=rt.model.task, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer,
              momentum=t.momentum)

    def sequential(n_steps):
        for shard, seed in zip(shards, seeds):
            rt.model.set_payload(payload)
            train_steps(rt.model.model, split, shard, steps=n_steps, seed=seed, **kw)

    def batched(n_steps):
        train_clients_batched(rt.model, split, shards, seeds, [payload] * clients, steps=n_steps, **kw)

    sequential(1)
    batched(1)
    seq_s = _best_of(lambda: sequential(steps), 1)
    batched_s = _best_of(lambda: batched(steps), 1)
    rt.model.set_payload(payload)
    work = clients * steps
    return {
        "model": cfg.model.name,
        "clients": clients,
        "steps": steps,
        "batch_size": t.batch_size,
        "max_length": cfg.model.max_length,
        "sequential_s": seq_s,
        "batched_s": batched_s,
        "sequential_client_steps_per_s": work / seq_s,
        "batched_client_steps_per_s": work / batched_s,
        "batched_vs_sequential_speedup": seq_s / batched_s,
    }


BENCHMARKS: dict[str, Callable[[Config], dict[str, float]]] = {
    "resident_model": bench_resident_model,
    "payload_bytes": bench_payload_bytes,
    "dp_step": bench_dp_step,
    "batched": bench_batched,
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
