"""Exercise fedpeft's GPU paths on a machine with CUDA and print their timings as JSON.

    python tools/gpu_check.py                   # MiniLM, in-process engine, cuda:0
    python tools/gpu_check.py --quick           # tiny BERT: seconds, checks the paths only
    python tools/gpu_check.py --simulation      # also the Ray engine with client_gpus = 0.25
    python tools/gpu_check.py --cpu-baseline    # also each federation on the CPU, for the speed-up
    python tools/gpu_check.py --quick --device cpu   # the script's own dry run where there is no GPU

Runs, each in a fresh run folder under ``--out`` (default: a temporary folder):

* ``fp32``: a federation on ``federation.device = "cuda"`` in float32;
* ``bf16``: the same in ``model.dtype = "bfloat16"`` (autocast);
* ``dp``: the same with sample-level DP-SGD (opacus, noise on the GPU);
* ``dp_bf16``: sample-level DP under bfloat16;
* ``audit``: ``fedpeft audit`` on the GPU (label recovery, linear inversion,
  LoRA span; the client-path canary audit with sample DP);
* with ``--simulation``, ``simulation``: the Ray engine, each client worker
  reserving a quarter of the GPU;
* with ``--cpu-baseline``, ``<name>_cpu`` for each federation.

Each run records its wall time, the device ``summary.json`` names, its
accuracy, loss and epsilon, and the peak GPU memory. The JSON goes to
stdout and to ``gpu_check.json`` in ``--out``. Exit status 1 if CUDA is
missing or a run did not land on the GPU; the figures are for the README's
"Devices" section.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0",
                     "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fedpeft  # noqa: E402

# A federation that takes a minute or so on a GPU (MiniLM), or seconds (tiny BERT).
FULL = ['model.name="minilm"', 'federation.engine="inprocess"', "federation.num_clients=10", "federation.num_rounds=3",
        "train.local_steps=10", "train.batch_size=16", "data.max_test_examples=512"]
QUICK = ['model.name="tiny-bert"', "model.max_length=16", 'federation.engine="inprocess"', "federation.num_clients=2",
         "federation.num_rounds=2", "train.local_steps=2", "train.batch_size=8", "data.max_examples_per_client=32",
         "data.max_test_examples=32", 'data.partition="iid"']
DP = ['dp.mode="sample"', "dp.noise_multiplier=1.0", "dp.delta=1e-3"]
BF16 = ['model.dtype="bfloat16"']
AUDIT = ['dp.mode="sample"', "dp.noise_multiplier=1.0", "dp.delta=1e-3", "audit.studies=false"]


def _peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else 0.0


def run_federation(name: str, overrides: list[str], out: Path) -> dict:
    """One federation; its wall time, device and result."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = fedpeft.run(overrides=overrides, out=out / name)
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "device": summary["device"], "dtype": summary["dtype"],
            "final_accuracy": summary["final_accuracy"], "final_loss": summary["final_loss"],
            "epsilon": summary["epsilon"], "peak_gpu_gb": _peak_gb(), "overrides": overrides}


def run_audit(overrides: list[str], out: Path) -> dict:
    """``fedpeft audit`` on the GPU; its wall time and the first experiment's headline figures."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = fedpeft.audit(overrides=overrides, out=out / "audit")
    wall = time.perf_counter() - t0
    empirical = result.get("empirical") or {}
    return {"wall_s": round(wall, 2), "experiments": len(result["experiments"]),
            "empirical_epsilon_lower": empirical.get("epsilon_lower"),
            "empirical_epsilon_accountant": empirical.get("epsilon_accountant"),
            "peak_gpu_gb": _peak_gb(), "overrides": overrides}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny BERT instead of MiniLM (checks paths, not speed)")
    parser.add_argument("--simulation", action="store_true", help="also the Ray engine with client_gpus = 0.25")
    parser.add_argument("--cpu-baseline", action="store_true", help="also every federation on the CPU")
    parser.add_argument("--device", default="cuda", help="federation.device for the GPU runs (default cuda)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the run folders and gpu_check.json")
    args = parser.parse_args(argv)
    dry = args.device == "cpu"  # the script's own check on a machine without a GPU: same runs, no GPU figures
    if not dry and not torch.cuda.is_available():
        print(json.dumps({"error": f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"}))
        return 1
    out = args.out or Path(tempfile.mkdtemp(prefix="fedpeft-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    base = QUICK if args.quick else FULL
    device = [f'federation.device="{args.device}"']
    runs = {"fp32": base + device, "bf16": base + device + BF16, "dp": base + device + DP,
            "dp_bf16": base + device + DP + BF16}
    report: dict = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cuda": torch.version.cuda, "torch": torch.__version__,
        "cpu_cores": os.cpu_count(), "workload": "quick (tiny BERT)" if args.quick else "MiniLM", "runs": {},
    }
    failures = []
    for name, overrides in runs.items():
        report["runs"][name] = result = run_federation(name, overrides, out)
        if not dry and not result["device"].startswith("cuda"):
            failures.append(f"{name} ran on {result['device']}")
    if args.simulation:
        sim = [o for o in base if "engine" not in o] + device + ['federation.engine="simulation"',
                                                                  f"federation.client_gpus={0.0 if dry else 0.25}"]
        report["runs"]["simulation"] = run_federation("simulation", sim, out)
    if args.cpu_baseline:
        for name, overrides in list(runs.items()):
            cpu = [o for o in overrides if not o.startswith("federation.device")] + ['federation.device="cpu"']
            report["runs"][f"{name}_cpu"] = result = run_federation(f"{name}_cpu", cpu, out)
            gpu_wall = report["runs"][name]["wall_s"]
            report["runs"][name]["speedup_over_cpu"] = round(result["wall_s"] / gpu_wall, 2) if gpu_wall else math.nan
    audit = base + device + AUDIT + (["audit.victims=4", "audit.canary_trials=50", "audit.prior_examples=200"] if args.quick else [])
    report["audit"] = run_audit(audit, out)
    if report["audit"]["experiments"] == 0:
        failures.append("the audit ran no experiment")
    report["failures"] = failures
    text = json.dumps(report, indent=2, default=str)
    (out / "gpu_check.json").write_text(text + "\n")
    print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
