"""The "Write your own strategy" guide's example works as the guide says."""

import json
from pathlib import Path

import numpy as np

from strategies import LoRAFactors
from strategies.testing import check_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_guide_shows_the_example_file_verbatim():
    code = (ROOT / "mystrategies/median_lora.py").read_text()
    assert code.strip() in (ROOT / "docs/write-your-own-strategy.md").read_text()
    assert len(code.splitlines()) < 40


def test_example_passes_the_conformance_check_and_takes_the_median():
    from mystrategies.median_lora import MedianLoRA

    check_strategy(MedianLoRA)
    rng = np.random.default_rng(0)
    state = MedianLoRA().initialize({"m": LoRAFactors(A=rng.normal(size=(2, 5)).astype(np.float32),
                                                      B=np.zeros((4, 2), np.float32), scaling=2.0)})
    from strategies import ClientUpdate

    # Two clients agree, a third sends a huge opposite update: the median ignores it.
    a, b = rng.normal(size=(2, 5)), rng.normal(size=(4, 2))
    updates = [ClientUpdate(str(i), {"m": LoRAFactors(A=a.astype(np.float32), B=(k * b).astype(np.float32), scaling=2.0)}, 10)
               for i, k in enumerate([1.0, 1.0, -50.0])]
    new = MedianLoRA().aggregate(state, updates)
    assert np.allclose(new.effective_delta("m"), 2.0 * b @ a, atol=1e-5)


def test_example_runs_in_a_federation_by_path(tmp_path):
    from fedpeft.validation import load_config
    from fedpeft.engine import run_engine

    cfg = load_config(None, ['strategy.name="mystrategies.median_lora:MedianLoRA"', "strategy.trim_rank=4",
                             'federation.engine="inprocess"', "federation.num_clients=3", "federation.num_rounds=1",
                             "train.local_steps=1", "data.max_examples_per_client=16", "data.max_test_examples=16"])
    run_engine(cfg, tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["failed"] == [] and metrics[-1]["aggregation_error"] is not None
