"""`fedpeft bench` through the console script: every benchmark runs (on the tiny
random-weight BERT, seconds) and writes the JSON its docstrings and the README describe."""

from __future__ import annotations

import json

import pytest

TINY = ['model.name="tiny-bert"', "model.max_length=16", "data.max_examples_per_client=16", "train.batch_size=4",
        "federation.num_clients=2"]
KEYS = {
    "resident_model": {"model", "adapter_swap_s", "model_rebuild_s", "rebuild_over_swap"},
    "payload_bytes": {"lora_payload_bytes", "full_model_bytes", "full_over_lora"},
    "dp_step": {"batch_size", "plain_step_s", "dp_step_s", "dp_over_plain"},
}


def test_bench_runs_every_benchmark_and_writes_its_ratios(tmp_path, fedpeft_cli):
    """Every benchmark but ``scale``, whose federations of 100 to 10,000 clients take minutes (tested below)."""
    out = tmp_path / "results" / "bench.json"
    args = ["bench", "--out", str(out)]
    for name in KEYS:
        args += ["--name", name]
    for o in TINY:
        args += ["--set", o]
    proc = fedpeft_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert json.loads(proc.stdout) == results, "stdout and the file disagree"
    assert {"machine", "python", "benchmarks"} <= results.keys()
    bench = results["benchmarks"]
    assert {name: set(values) for name, values in bench.items()} == KEYS
    # Each ratio is its two timings' (or sizes') quotient, the timings positive.
    resident, payload, dp = bench["resident_model"], bench["payload_bytes"], bench["dp_step"]
    assert resident["model"] == "tiny-bert"
    assert min(resident["adapter_swap_s"], resident["model_rebuild_s"], dp["plain_step_s"], dp["dp_step_s"]) > 0
    assert resident["rebuild_over_swap"] == pytest.approx(resident["model_rebuild_s"] / resident["adapter_swap_s"])
    assert dp["dp_over_plain"] == pytest.approx(dp["dp_step_s"] / dp["plain_step_s"])
    assert dp["batch_size"] == 4
    # The byte counts are the model's own: its float32 trainable tensors vs every base-model parameter.
    from fedpeft.validation import load_config
    from fedpeft.runtime import runtime

    rt = runtime(load_config(None, TINY))
    assert payload["lora_payload_bytes"] == 4 * rt.model.trainable_params
    base = sum(p.numel() for n, p in rt.model.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n)
    assert payload["full_model_bytes"] == 4 * base  # the base model alone: no LoRA factor, no trainable head copy
    assert payload["full_over_lora"] == pytest.approx(payload["full_model_bytes"] / payload["lora_payload_bytes"])


def test_bench_scale_measures_each_size_in_its_own_process(tmp_path):
    from fedpeft.bench import BENCHMARKS, bench_scale
    from fedpeft.validation import load_config

    assert BENCHMARKS["scale"] is bench_scale
    cfg = load_config(None, TINY + ['federation.engine="inprocess"', "data.max_test_examples=16"])
    result = bench_scale(cfg, sizes=(10, 40))
    phases = ("startup_s", "round_s", "peak_rss_mb", "startup_cpu_s", "round_cpu_s")
    assert set(result) == {f"clients_{n}_{p}" for n in (10, 40) for p in phases}
    for n in (10, 40):
        # A fresh process imports torch and builds a model: well over 100 MB and a CPU second before round 0 ends.
        assert result[f"clients_{n}_peak_rss_mb"] > 100 and result[f"clients_{n}_startup_cpu_s"] > 1
        assert result[f"clients_{n}_startup_s"] > result[f"clients_{n}_round_s"] > 0


def test_bench_runs_only_the_named_benchmark(tmp_path, fedpeft_cli):
    out = tmp_path / "bench.json"
    args = ["bench", "--name", "payload_bytes", "--out", str(out)]
    for o in TINY:
        args += ["--set", o]
    proc = fedpeft_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(json.loads(out.read_text())["benchmarks"]) == ["payload_bytes"]


def test_an_unknown_benchmark_is_one_line_naming_the_valid_ones(tmp_path, fedpeft_cli, assert_user_error):
    proc = fedpeft_cli("bench", "--name", "nope", "--out", str(tmp_path / "b.json"), cwd=tmp_path)
    assert_user_error(proc, "--name", "'nope'", "resident_model", "payload_bytes", "dp_step")
    assert not (tmp_path / "b.json").exists()
