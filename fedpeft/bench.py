"""Performance benchmarks: ratios measured side by side in one run.

Each benchmark in :data:`BENCHMARKS` is a function of the run's config (and,
when it takes a ``ctx`` argument, the :class:`BenchContext`: quick or full,
a scratch folder, a progress callback). It returns a dict of raw timings plus
the figures that matter. A figure of :data:`FIGURES` is found by its key
(``"overhead_fraction"``, or a dotted path into a group such as
``"vs_plain_loop.time_ratio"``) in whichever benchmark reports it; a figure
nobody reports, or one reported as None, is written as null beside a
``<key>_reason`` string saying why (``"batched_vs_centralized_ratio": null,
"batched_vs_centralized_ratio_reason": "needs a GPU"``), never as a made-up
number. :func:`write_results` writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config
from fedpeft.validation import load_config

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"

QUICK = ("federation.num_rounds=2", "train.local_steps=2", "data.max_test_examples=256")
"""``--quick``: the same benchmarks on a smaller workload (overridden in turn by ``--set``)."""

CLIENT_SETUP_MODELS = ("smollm2", "minilm")
"""The models ``client_setup_speedup`` compares the two clients on (unless ``--set model.name`` picks one)."""


@dataclass
class BenchContext:
    """What a benchmark may need besides the config.

    Parameters
    ----------
    quick : bool
        ``--quick``: fewer repeats (the workload itself is already in the config).
    workdir : Path
        A scratch folder of this bench run (run folders, checkpoints), removed afterwards.
    overrides : list of str
        The ``--set`` overrides (after :data:`QUICK`): a benchmark that builds its own configs applies them too.
    progress : callable
        ``progress(text)`` shows what is being measured now.
    """

    quick: bool = False
    workdir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    overrides: list[str] = field(default_factory=list)
    progress: Callable[[str], None] = lambda text: None

    @property
    def repeats(self) -> int:
        return 1 if self.quick else 3


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
    return {"lora_payload_bytes": lora, "full_model_bytes": full, "full_over_lora": full / lora,
            "bytes_vs_full_finetune": full / lora}


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
    return {"batch_size": size, "plain_step_s": plain, "dp_step_s": private, "dp_over_plain": private / plain,
            "dp_step_ratio": private / plain}


def bench_batched(cfg: Config, clients: int = 8, steps: int = 3) -> dict[str, float]:
    """``clients`` clients' local steps trained together (the batched engine) vs one after another.

    Both train the same clients from the same payload for ``steps`` steps of
    ``train.batch_size`` with dropout off, so the ratio measures the batched
    matmuls (with dropout on, each client still draws its own masks and runs
    attention on its own rows, as it would alone); each is timed after one untimed warm-up step. The ratio is clients x steps
    per second, batched over sequential. ``batched_vs_centralized_ratio`` is
    the batched pass's examples per second over one centralised client
    training a single adapter on the union of the shards at batch
    ``clients x train.batch_size``: the same rows through the same base model,
    the practical ceiling of any multi-client pass.
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

    union = np.concatenate(shards)
    central_kw = {**kw, "batch_size": clients * t.batch_size}

    def centralised(n_steps):
        rt.model.set_payload(payload)
        train_steps(rt.model.model, split, union, steps=n_steps, seed=0, **central_kw)

    sequential(1)
    batched(1)
    centralised(1)
    seq_s = _best_of(lambda: sequential(steps), 1)
    batched_s = _best_of(lambda: batched(steps), 1)
    central_s = _best_of(lambda: centralised(steps), 1)
    rt.model.set_payload(payload)
    work = clients * steps
    batched_rows = sum(min(t.batch_size, len(shard)) for shard in shards) * steps
    central_rows = min(clients * t.batch_size, len(union)) * steps
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
        "centralized_s": central_s,
        "batched_vs_centralized_ratio": (batched_rows / batched_s) / (central_rows / central_s),
    }


def bench_client_setup(cfg: Config, ctx: BenchContext) -> dict[str, Any]:
    """A FlowerTune-style client that rebuilds model and adapter per message, against fedpeft's resident client.

    On SmolLM2 and MiniLM (or the one model ``--set model.name`` names): the
    same train message (the initial adapter), the same shard, steps and seed on
    both clients, timed best of ``ctx.repeats`` after one untimed warm-up round each. ``client_setup_speedup`` is
    the ratio of the set-up times (message in to the first local step),
    ``client_round_speedup`` that of the whole client round.
    """
    from fedpeft.bench_clients import RebuildingClient, ResidentClient, client_round, lora_config, save_base_checkpoint
    from fedpeft.client.app import client_seed
    from fedpeft.runtime import runtime
    from fedpeft.wire import to_array_record

    chosen = any(o.split("=", 1)[0].strip() == "model.name" for o in ctx.overrides)
    models = (cfg.model.name,) if chosen else CLIENT_SETUP_MODELS
    setup, whole, raw = {}, {}, {}
    for name in models:
        label = Path(name).name
        mcfg = cfg if chosen else load_config(None, [*ctx.overrides, f'model.name="{name}"'])
        if mcfg.model.pooling != "cls":
            reason = f"model.pooling = {mcfg.model.pooling!r} is fedpeft's own head, not one from_pretrained rebuilds"
            setup[label], setup[f"{label}_reason"] = None, reason
            whole[label], whole[f"{label}_reason"] = None, reason
            continue
        ctx.progress(f"client set-up: {label}, resident model")
        rt = runtime(mcfg)
        split, _ = rt.splits
        cid = 0
        shard = rt.shards[cid]
        initial = rt.model.initial
        message = to_array_record(initial.arrays())
        scalings = initial.scalings()
        seed = client_seed(mcfg.federation.seed, 1, cid)
        ctx.progress(f"client set-up: {label}, writing its checkpoint folder")
        folder = save_base_checkpoint(mcfg, rt.data.num_labels, ctx.workdir / f"checkpoint-{label}")
        clients = {"resident": ResidentClient(rt), "rebuilding": RebuildingClient(folder, rt.model.task, lora_config(mcfg))}
        for kind, client in clients.items():
            # Untimed: a resident client is warm after its first round, and the rebuilding one's
            # checkpoint is in the page cache after its first load, as in any round after the first.
            ctx.progress(f"client set-up: {label}, warming up the {kind} client")
            client_round(client, message, scalings, mcfg, split, shard, seed=seed, steps=1)
        best: dict[str, dict[str, float]] = {}
        for _ in range(ctx.repeats):
            for kind, client in clients.items():
                ctx.progress(f"client set-up: {label}, {kind} client")
                result = client_round(client, message, scalings, mcfg, split, shard, seed=seed)
                mine = best.setdefault(kind, {"setup_s": math.inf, "round_s": math.inf})
                mine["setup_s"] = min(mine["setup_s"], result["setup_s"])
                mine["round_s"] = min(mine["round_s"], result["round_s"])
                mine["train_loss"] = result["train_loss"]
        rt.model.set_payload(initial)
        res, reb = best["resident"], best["rebuilding"]
        setup[label] = reb["setup_s"] / res["setup_s"]
        whole[label] = reb["round_s"] / res["round_s"]
        raw[label] = {"local_steps": mcfg.train.local_steps, "batch_size": mcfg.train.batch_size,
                      "resident_setup_s": res["setup_s"], "rebuilding_setup_s": reb["setup_s"],
                      "resident_round_s": res["round_s"], "rebuilding_round_s": reb["round_s"],
                      "resident_train_loss": res["train_loss"], "rebuilding_train_loss": reb["train_loss"]}
    if chosen:
        for name in CLIENT_SETUP_MODELS:
            if name not in setup:
                reason = f"not measured: --set model.name={cfg.model.name} picked one model"
                setup[name], setup[f"{name}_reason"] = None, reason
                whole[name], whole[f"{name}_reason"] = None, reason
    return {"client_setup_speedup": setup, "client_round_speedup": whole, "models": raw}


def _concurrent_clients(cfg: Config) -> int:
    """How many clients train at the same time: Ray workers (cores / ``client_cpus``) or, in-process, one.

    The batched engine counts as one lane: its clients' ``compute_s`` are
    equal shares of the one joint step loop, so they sum to its wall time.
    """
    if cfg.federation.engine in ("inprocess", "batched"):
        return 1
    return max(1, min(cfg.clients_per_round, int((os.cpu_count() or 1) // cfg.federation.client_cpus)))


def bench_federation(cfg: Config, ctx: BenchContext) -> dict[str, Any]:
    """The default run, timed round by round, against a plain one-process FedIT loop on the same workload.

    ``startup_s`` is the time to round 0's record (Ray, model loads, client
    discovery, the first evaluation); the training phase is rounds 1..R after
    it. ``overhead_fraction`` is the share of that phase the client workers
    do not spend in their step loops (forward, backward, optimizer steps:
    ``train_steps``'s ``compute_s``, summed over clients and divided by the
    workers training at once). ``vs_plain_loop`` compares the whole run (from
    the call to the final accuracy) with :func:`fedpeft.bench_plain_loop.run_plain_loop`.
    """
    import torch

    from fedpeft.bench_clients import save_base_checkpoint
    from fedpeft.bench_plain_loop import run_plain_loop
    from fedpeft.engine import run_engine
    from fedpeft.models.registry import get_model_spec
    from fedpeft.server.run_folder import RunFolder

    rounds, marks = cfg.federation.num_rounds, {}
    ctx.progress(f"default run: starting ({cfg.federation.engine} engine)")
    t0 = time.perf_counter()

    def on_round(line):
        marks[line["round"]] = time.perf_counter() - t0
        ctx.progress(f"default run: round {line['round']}/{rounds}")

    summary = run_engine(cfg, ctx.workdir / "default-run", on_round)
    fedpeft_s = time.perf_counter() - t0
    metrics = RunFolder(ctx.workdir / "default-run").read_metrics()
    training = marks[rounds] - marks[0]
    compute = [m.get("client_compute_s") for m in metrics[1:]]
    lanes = _concurrent_clients(cfg)
    out: dict[str, Any] = {"startup_s": marks[0], "training_s": training, "fedpeft_s": fedpeft_s,
                           "concurrent_clients": lanes, "accuracy": summary["final_accuracy"]}
    if any(c is None for c in compute):
        out["overhead_fraction"] = None
        out["overhead_fraction_reason"] = "the clients keep their step timings to themselves under DP"
    else:
        out["client_compute_s"] = sum(compute)
        out["overhead_fraction"] = max(0.0, 1.0 - sum(compute) / (lanes * training))
    spec = get_model_spec(cfg.model.name, cfg.model.task)
    if spec.task != "classification" or cfg.model.pooling != "cls" or cfg.dp.mode != "none" or cfg.strategy_name != "fedit":
        out["vs_plain_loop"] = {"time_ratio": None, "time_ratio_reason": "the plain loop is FedIT on a sequence "
                                "classifier without DP", "accuracy": summary["final_accuracy"], "plain_accuracy": None,
                                "plain_accuracy_reason": "not run (see time_ratio_reason)"}
        return out
    folder = save_base_checkpoint(cfg, _num_labels(cfg), ctx.workdir / "plain-loop-base")
    ctx.progress("plain FedIT loop: training the same rounds, clients and steps")
    torch.set_num_threads(cfg.federation.threads or os.cpu_count() or 1)
    p = cfg.peft
    plain = run_plain_loop(cfg, folder, target_modules=list(p.target_modules or spec.default_targets),
                           modules_to_save=list(p.modules_to_save or spec.head_modules))
    out["plain_s"] = plain["wall_s"]
    out["vs_plain_loop"] = {"time_ratio": fedpeft_s / plain["wall_s"], "accuracy": summary["final_accuracy"],
                            "plain_accuracy": plain["accuracy"]}
    return out


def _num_labels(cfg: Config) -> int:
    from fedpeft.runtime import runtime

    return runtime(cfg).data.num_labels


SCALE_WORKLOAD = ('data.partition="iid"', "federation.clients_per_round=10", "federation.num_rounds=3",
                  "train.local_steps=2", "data.max_test_examples=200", "federation.client_eval=false")
"""The scale benchmark's federation on top of the given config: a systems test, not a learning one."""


def bench_scale(cfg: Config, sizes: tuple[int, ...] = (100, 1000, 10000),
                ctx: BenchContext | None = None) -> dict[str, Any]:
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
    flat as ``N`` grows. A ``--quick`` bench run leaves them out (null, with
    the reason): three fresh federations take minutes.
    """
    if ctx is not None and ctx.quick:
        reason = ("not run by --quick: the scale benchmark starts three fresh federations of 100 to 10,000 clients "
                  "(minutes); run `fedpeft bench` or `fedpeft bench --name scale`")
        return {f"clients_{n}_{what}": None for n in sizes for what in ("peak_rss_mb", "round_s", "startup_s")} | {
            f"clients_{n}_{what}_reason": reason for n in sizes for what in ("peak_rss_mb", "round_s", "startup_s")}
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


BENCHMARKS: dict[str, Callable[..., dict[str, Any]]] = {
    "resident_model": bench_resident_model,
    "payload_bytes": bench_payload_bytes,
    "dp_step": bench_dp_step,
    "client_setup": bench_client_setup,
    "federation": bench_federation,
    "batched": bench_batched,
    "scale": bench_scale,
}


@dataclass(frozen=True)
class Figure:
    """One line of the bench table: a key, what it means, its target and who reports it."""

    key: str
    about: str
    target: str = ""
    met: Callable[[float, dict[str, Any]], bool] | None = None
    source: str = ""


def _get(results: dict[str, Any], key: str) -> Any:
    node: Any = results
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


FIGURES: tuple[Figure, ...] = (
    Figure("client_setup_speedup.smollm2", "SmolLM2: per-message set-up, FlowerTune-style rebuild / resident swap",
           ">= 20", lambda v, r: v >= 20, "client_setup"),
    Figure("client_setup_speedup.minilm", "MiniLM: the same", source="client_setup"),
    Figure("client_round_speedup.smollm2", "SmolLM2: whole client round (set-up + local steps), rebuild / resident",
           source="client_setup"),
    Figure("client_round_speedup.minilm", "MiniLM: the same", source="client_setup"),
    Figure("startup_s", "default run: seconds to round 0 (Ray, model loads, discovery, first evaluation)",
           source="federation"),
    Figure("overhead_fraction", "default run: share of rounds 1..R not in client forward/backward/optimizer steps",
           "<= 0.15", lambda v, r: v <= 0.15, "federation"),
    Figure("vs_plain_loop.time_ratio", "default run wall time / plain one-process FedIT loop's", "<= 1.0",
           lambda v, r: v <= 1.0, "federation"),
    Figure("vs_plain_loop.accuracy", "default run: final test accuracy", ">= plain - 0.02",
           lambda v, r: r.get("vs_plain_loop", {}).get("plain_accuracy") is not None
           and v >= r["vs_plain_loop"]["plain_accuracy"] - 0.02, "federation"),
    Figure("vs_plain_loop.plain_accuracy", "plain loop: final test accuracy", source="federation"),
    Figure("bytes_vs_full_finetune", "bytes of the full model / bytes of one LoRA payload", source="payload_bytes"),
    Figure("dp_step_ratio", "one DP-SGD step / one plain step, same batch", source="dp_step"),
    *(Figure(f"clients_{n}_{what}", f"{n:,} clients: {about}", target, met, "scale")
      for n in (100, 1000, 10000)
      for what, about, target, met in (
          ("peak_rss_mb", "peak memory of the process tree (MB)", "< 4000 (Ray)", lambda v, r: v < 4000),
          ("round_s", "seconds per round", "<= 1.2 x at 100" if n > 100 else "",
           (lambda v, r: r.get("clients_100_round_s") is not None and v <= 1.2 * r["clients_100_round_s"])
           if n > 100 else None),
          ("startup_s", "seconds to round 0", "<= 1.2 x at 100" if n > 100 else "",
           (lambda v, r: r.get("clients_100_startup_s") is not None and v <= 1.2 * r["clients_100_startup_s"])
           if n > 100 else None))),
    Figure("batched_vs_sequential_speedup", "batched engine: clients x steps per second over sequential clients",
           ">= 8 (GPU, K = 16)", source="batched"),
    Figure("batched_vs_centralized_ratio", "batched engine: examples per second over one centralised run at batch K x B",
           ">= 0.8 (GPU)", source="batched"),
)


def _set(results: dict[str, Any], key: str, value: Any, reason: str | None) -> None:
    *groups, last = key.split(".")
    node = results
    for part in groups:
        node = node.setdefault(part, {})
    node[last] = value
    if reason is not None:
        node[f"{last}_reason"] = reason


def machine() -> dict[str, Any]:
    """The machine the figures were measured on: CPU model, cores, memory, torch and the device."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "device": device, "python": platform.python_version(),
            "platform": platform.platform()}


def assemble(raw: dict[str, dict[str, Any]], ran: list[str]) -> dict[str, Any]:
    """The figures of :data:`FIGURES` from the benchmarks' raw results (null with a reason where none reports one)."""
    out: dict[str, Any] = {}
    for fig in FIGURES:
        value, reason = None, None
        for result in raw.values():
            found = _get(result, fig.key)
            if found is not None:
                value = found
                break
            reason = reason or _get(result, f"{fig.key}_reason")
        if value is None and reason is None:
            if fig.source in ran:
                reason = f"the {fig.source} benchmark did not report it"
            elif fig.source in BENCHMARKS:
                reason = f"not run: this bench run left out the {fig.source} benchmark (--name)"
            else:
                reason = f"not measured: no benchmark registered in fedpeft.bench.BENCHMARKS reports it ({fig.source})"
        if isinstance(value, float) and not math.isfinite(value):
            value, reason = None, f"not finite ({value})"
        _set(out, fig.key, value, None if value is not None else reason)
    out["targets"] = {fig.key: {"target": fig.target, "met": _met(fig, out)} for fig in FIGURES if fig.target}
    return out


def _met(fig: Figure, figures: dict[str, Any]) -> bool | None:
    value = _get(figures, fig.key)
    if value is None or fig.met is None:
        return None
    return bool(fig.met(value, figures))


def run_benchmarks(names: list[str] | None = None, overrides: list[str] | None = None, *, quick: bool = False,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the named benchmarks (default: all) and assemble ``bench.json``'s content.

    ``quick`` applies :data:`QUICK` before ``overrides``; the config of every
    benchmark is the embedded default with them.
    """
    all_overrides = [*(QUICK if quick else ()), *(overrides or [])]
    cfg = load_config(None, all_overrides)
    selected = names or list(BENCHMARKS)
    started = time.perf_counter()
    raw: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedpeft-bench-") as scratch:
        for name in selected:
            fn = BENCHMARKS[name]
            workdir = Path(scratch) / name
            workdir.mkdir()
            ctx = BenchContext(quick=quick, workdir=workdir, overrides=all_overrides,
                               progress=(lambda text, name=name: progress(f"{name}: {text}")) if progress else (lambda t: None))
            ctx.progress("starting")
            raw[name] = fn(cfg, ctx=ctx) if "ctx" in inspect.signature(fn).parameters else fn(cfg)
    return {"machine": machine(), "quick": quick, "cost_s": round(time.perf_counter() - started, 1),
            "overrides": all_overrides, **assemble(raw, selected), "benchmarks": raw}


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    """``bench.md``: the machine, the run's cost, and one row per figure (value, target, met or not)."""
    m = results["machine"]
    kind = "quick (`fedpeft bench --quick`)" if results["quick"] else "full (`fedpeft bench`)"
    lines = [f"# fedpeft bench: {kind}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GiB RAM, torch {m['torch']}, device {m['device']}. "
             f"Cost of this run: {results['cost_s']:.0f} s.", "",
             "| key | value | target | met | what |", "|---|--:|---|---|---|"]
    for fig in FIGURES:
        value = _get(results, fig.key)
        met = results["targets"].get(fig.key, {}).get("met")
        met_text = "" if not fig.target else ("met" if met else "not met" if met is not None else "–")
        about = fig.about if value is not None else f"{fig.about}; null: {_get(results, fig.key + '_reason')}"
        lines.append(f"| `{fig.key}` | {_cell(value)} | {fig.target} | {met_text} | {about} |")
    if results.get("overrides"):
        lines += ["", "Overrides: " + ", ".join(f"`{o}`" for o in results["overrides"])]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """``bench.json`` and ``bench.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BENCH_JSON).write_text(json.dumps(results, indent=2) + "\n")
    (folder / BENCH_MD).write_text(markdown(results))
    return folder / BENCH_JSON, folder / BENCH_MD
