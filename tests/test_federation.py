"""End-to-end federations through the real `fedpeft run` command (Flower + Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import without_timings

SMALL = [
    "federation.engine=simulation",  # the one end-to-end run through Ray (the default engine, named all the same)
    "federation.num_clients=3",
    "federation.num_rounds=2",
    "train.local_steps=6",
    "data.max_examples_per_client=120",
    "data.max_test_examples=128",
    "model.max_length=32",
    "federation.name=e2e",
    "federation.client_eval=true",
]
SUMMARY_KEYS = {
    "strategy", "num_rounds", "num_clients", "final_accuracy", "final_loss", "bytes_up", "bytes_down",
    "full_finetune_bytes_per_round", "epsilon", "delta", "wall_s", "seed", "config",
}


@pytest.fixture(scope="session")
def fedpeft_run(fedpeft_cli):
    """``fedpeft run --out OUT --set ...`` through the console script; fails the test unless it succeeds."""

    def run(out, overrides: list[str], timeout: int = 900):
        args = ["run", "--out", str(out)]
        for o in overrides:
            args += ["--set", o]
        result = fedpeft_cli(*args, cwd=out.parent, timeout=timeout, env={"COLUMNS": "200"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    return run


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, fedpeft_run):
    out = tmp_path_factory.mktemp("e2e") / "run"
    result = fedpeft_run(out, SMALL)
    assert f"run folder: {out}" in result.stdout
    return out


def test_training_beats_round_zero_and_every_file_exists(small_run, read_run):
    summary, metrics = read_run(small_run)
    assert SUMMARY_KEYS <= summary.keys()
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]
    assert summary["final_accuracy"] == metrics[-1]["accuracy"]
    assert summary["epsilon"] is None
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "report.md",
                 "plots/accuracy.png", "plots/bytes.png", "checkpoint/latest.json"):
        assert (small_run / name).is_file(), name
    assert (small_run / "plots/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{100 * summary['final_accuracy']:.2f}%" in (small_run / "report.md").read_text()


def test_bytes_are_the_adapter_payload_both_ways(small_run, read_run):
    summary, metrics = read_run(small_run)
    per_client = 4 * summary["trainable_params"]  # float32, fedit sends A, B and the head both ways
    for m in metrics[1:]:
        assert len(m["clients"]) == 3 and m["failed"] == []
        assert sorted(m["client_accuracy"]) == ["0", "1", "2"]
        assert all(0.0 <= a <= 1.0 for a in m["client_accuracy"].values())
        assert m["bytes_up"] == m["bytes_down"] == 3 * per_client
    assert summary["bytes_up"] == sum(m["bytes_up"] for m in metrics)
    assert summary["full_finetune_bytes_per_round"] == 2 * 3 * 4 * summary["total_params"]
    # The README's count for the default model (MiniLM, LoRA r=8 on query/value, BERT's head).
    assert summary["trainable_params"] == 222_338
    assert f"{100 * summary['trainable_params'] / summary['total_params']:.2f}%" == "0.98%"


def test_exported_adapter_reproduces_the_reported_accuracy(small_run, read_run):
    """Loading adapter/ with plain peft on a fresh base gives fedpeft's final accuracy."""
    import torch
    from peft import PeftModel

    from fedpeft.validation import config_from_dict
    from fedpeft.data import load_dataset
    from fedpeft.models.minilm import load_minilm
    from fedpeft.training import encode

    summary, _ = read_run(small_run)
    cfg = config_from_dict(summary["config"])
    base, tokenizer = load_minilm(num_labels=2, dropout=cfg.model.dropout)
    model = PeftModel.from_pretrained(base, small_run / "adapter").eval()
    data = load_dataset(cfg.data.dataset)
    n = cfg.data.max_test_examples
    test = encode(data.test_texts[:n], data.test_labels[:n], tokenizer, cfg.model.max_length)
    correct = 0
    with torch.inference_mode():
        for i in range(0, n, 64):
            b = test.batch(np.arange(i, min(i + 64, n)), "classification")
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            correct += int((logits.argmax(-1) == b["labels"]).sum())
    assert correct / n == pytest.approx(summary["final_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_the_batched_engine_gives_what_the_ray_engine_gives(small_run, tmp_path, read_run):
    """The engine changes where the clients run, not what they compute: the same config on the batched
    (in-process) engine gives the Ray run's accuracies and losses, to the float rounding batching allows."""
    import fedpeft

    config = [o for o in SMALL if not o.startswith("federation.engine")] + ["federation.engine=batched",
                                                                              "federation.threads=1"]
    fedpeft.run(overrides=config, out=tmp_path / "batched")
    ray_summary, ray_metrics = read_run(small_run)
    summary, metrics = read_run(tmp_path / "batched")
    assert summary["config"]["federation"]["engine"] == "batched"
    assert len(metrics) == len(ray_metrics) == 3
    for ours, theirs in zip(metrics, ray_metrics):
        assert ours["accuracy"] == theirs["accuracy"]
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
        assert ours["bytes_up"] == theirs["bytes_up"] and ours["clients"] == theirs["clients"]
        assert ours.get("client_accuracy") == theirs.get("client_accuracy")
    assert summary["final_accuracy"] == ray_summary["final_accuracy"]

@pytest.mark.slow
def test_smollm2_federation_perplexity_falls(tmp_path, fedpeft_run, read_run):
    out = tmp_path / "lm"
    fedpeft_run(out, [
        "model.name=smollm2", "federation.num_clients=2", "federation.num_rounds=2", "train.local_steps=4",
        "train.batch_size=4", "train.lr=0.002", "model.max_length=32", "data.max_examples_per_client=64",
        "data.max_test_examples=48", "train.eval_batch_size=16", "federation.name=lm",
    ])
    summary, metrics = read_run(out)
    assert summary["task"] == "causal_lm"
    assert metrics[-1]["perplexity"] < metrics[0]["perplexity"]
    assert summary["majority_baseline"] is None


@pytest.mark.slow  # README: "Without DP, seeds make a CPU run bit-for-bit repeatable" (in-process: test_resume)
def test_same_seed_gives_bit_identical_runs(tmp_path, fedpeft_run, read_run):
    runs = []
    for name in ("a", "b"):
        fedpeft_run(tmp_path / name, SMALL + ["federation.num_rounds=1"])
        runs.append(read_run(tmp_path / name)[1])
    assert without_timings(runs[0]) == without_timings(runs[1])
    a = (tmp_path / "a/adapter/adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b/adapter/adapter_model.safetensors").read_bytes()
