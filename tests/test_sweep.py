"""Sweep tables: one row per strategy, every cell filled, errors where measured."""

import json
from pathlib import Path

import pytest

from fedpeft.sweep import paired_differences, partition_overrides, render_table, summarise


def test_table_has_a_row_per_strategy_even_without_aggregation_errors():
    results = [
        {"strategy": s, "partition": p, "seed": k, "accuracy": 0.5 + 0.1 * k, "bytes": 1000, "wall_s": 2.0,
         "aggregation_error": (0.25 if s == "fedit" else None)}
        for s in ("fedit", "custom") for p in ("iid", "natural") for k in (0, 1)
    ]
    table = summarise(results)
    assert table[("fedit", "iid")]["mean"] == 0.55
    text = render_table(table, {"name": "t"}, full=False)
    rows = [line for line in text.splitlines() if line.startswith("| fedit") or line.startswith("| custom")]
    assert len(rows) == 2
    assert rows[0].endswith("| 2.50e-01 |") and rows[1].endswith("| – |")
    assert "0.550 ± 0.071" in rows[1]


def test_paired_differences_separate_a_consistent_gain_that_the_seed_spread_hides():
    # Seeds move every rule together by +-0.1 (a hard or easy split); "steady" gains 0.02 on every
    # seed, "noisy" gains 0.02 on average but swings by 0.05 between seeds.
    shift = {0: -0.1, 1: 0.0, 2: 0.1}
    gain = {"fedit": {0: 0.0, 1: 0.0, 2: 0.0}, "steady": {0: 0.021, 1: 0.019, 2: 0.020},
            "noisy": {0: 0.07, 1: -0.03, 2: 0.02}}
    results = [{"strategy": s, "partition": "dirichlet-0.1", "seed": k, "accuracy": 0.6 + shift[k] + gain[s][k],
                "bytes": 1, "wall_s": 1.0, "aggregation_error": None} for s in gain for k in shift]
    table = summarise(results)
    # Unpaired, the gain is a fifth of one seed standard deviation (0.1).
    assert table[("steady", "dirichlet-0.1")]["std"] > 4 * 0.02
    paired = paired_differences(results)
    steady, noisy = paired[("steady", "dirichlet-0.1")], paired[("noisy", "dirichlet-0.1")]
    assert steady["reference"] == "fedit" and ("fedit", "dirichlet-0.1") not in paired
    assert steady["mean"] == pytest.approx(0.02) and steady["std"] == pytest.approx(0.001)
    assert steady["separated"] and not noisy["separated"]
    text = render_table(table, {"name": "t"}, full=False, paired=paired)
    assert "| steady | +0.020 ± 0.001 ✓ |" in text
    assert "| noisy | +0.020 ± 0.050 |" in text
    # One seed gives no interval: never separated.
    one = paired_differences([r for r in results if r["seed"] == 0])
    assert not one[("steady", "dirichlet-0.1")]["separated"]


def test_partition_specs():
    assert partition_overrides("dirichlet:0.1") == ['data.partition="dirichlet"', "data.alpha=0.1"]
    assert partition_overrides("natural") == ['data.partition="natural"']


# --- `fedpeft sweep` through the console script ------------------------------------------------------

TINY_SWEEP = """
[federation]
engine = "inprocess"
num_clients = 2
num_rounds = 1
[train]
local_steps = 1
batch_size = 8
[data]
max_examples_per_client = 16
max_test_examples = 16
[model]
name = "tiny-bert"
max_length = 16
[sweep]
name = "tiny"
seeds = [0]
strategies = ["fedit", "ffa-lora"]
partitions = ["iid"]
"""


def without_wall_time(results_jsonl: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in results_jsonl.splitlines()]


def table_without_wall_time(table_md: str) -> list[list[str]]:
    """The table's rows, less the wall-time column (the 4th from the right)."""
    rows = [line.split("|") for line in table_md.splitlines() if line.startswith("|")]
    return [row[:-3] + row[-2:] for row in rows]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "tiny.toml"
    path.write_text(TINY_SWEEP)
    return path


@pytest.fixture(scope="module")
def whole_sweep(sweep_file, fedpeft_cli) -> Path:
    out = sweep_file.parent / "whole"
    proc = fedpeft_cli("sweep", "--config", str(sweep_file), "--out", str(out), cwd=sweep_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# Sweep: tiny" in proc.stdout and f"sweep folder: {out}" in proc.stdout
    return out


def test_sweep_runs_every_cell_and_writes_its_table(whole_sweep):
    results = without_wall_time((whole_sweep / "results.jsonl").read_text())
    assert [(r["strategy"], r["partition"], r["seed"]) for r in results] == [("fedit", "iid", 0), ("ffa-lora", "iid", 0)]
    for r in results:
        summary = json.loads((whole_sweep / r["strategy"] / "iid" / "seed0" / "summary.json").read_text())
        assert r["accuracy"] == summary["final_accuracy"]
        assert r["bytes"] == summary["bytes_up"] + summary["bytes_down"]
    # FFA-LoRA keeps A frozen and does not upload it: fewer bytes than FedIT.
    assert results[1]["bytes"] < results[0]["bytes"]
    accuracy_table, paired_table = (whole_sweep / "table.md").read_text().split("Accuracy minus fedit's")
    assert [row.split("|")[1].strip() for row in accuracy_table.splitlines() if row.startswith("| f")] == ["fedit", "ffa-lora"]
    # One seed: the paired difference, without a spread or a verdict.
    assert f"| ffa-lora | {results[1]['accuracy'] - results[0]['accuracy']:+.3f} |" in paired_table
    assert (whole_sweep / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_a_sweep_resumes_without_running_finished_runs_again(whole_sweep, sweep_file, fedpeft_cli):
    summaries = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in whole_sweep.glob("*/*/seed*/summary.json")}
    assert len(summaries) == 2
    # An interrupted run (folder without summary.json) is the only one that runs again, from its checkpoint:
    # this one was killed after its last round's, so its rounds are not trained or evaluated again.
    cut = whole_sweep / "ffa-lora" / "iid" / "seed0"
    (cut / "summary.json").unlink()
    rounds = (cut / "metrics.jsonl").read_text()
    proc = fedpeft_cli("sweep", "--config", str(sweep_file), "--out", str(whole_sweep), cwd=sweep_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = whole_sweep / "fedit" / "iid" / "seed0" / "summary.json"
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == summaries[kept], "a finished run ran again"
    assert (cut / "metrics.jsonl").read_text() == rounds, "the interrupted run started again instead of resuming"
    rerun = json.loads((cut / "summary.json").read_text())
    assert {k: v for k, v in rerun.items() if k != "wall_s"} == \
           {k: v for k, v in json.loads(summaries[cut / "summary.json"][1]).items() if k != "wall_s"}


@pytest.mark.slow
def test_two_shards_together_give_the_whole_sweeps_table(whole_sweep, sweep_file, fedpeft_cli):
    out = sweep_file.parent / "sharded"
    first = fedpeft_cli("sweep", "--config", str(sweep_file), "--out", str(out), "--shard", "0/2", cwd=sweep_file.parent)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "shard 0/2 done; 1 of 2 runs finished" in first.stdout and not (out / "table.md").exists()
    assert [p.parts[-4] for p in out.glob("*/*/seed*/summary.json")] == ["fedit"]  # every 2nd run from 0
    second = fedpeft_cli("sweep", "--config", str(sweep_file), "--out", str(out), "--shard", "1/2", cwd=sweep_file.parent)
    assert second.returncode == 0, second.stdout + second.stderr
    assert without_wall_time((out / "results.jsonl").read_text()) == \
           without_wall_time((whole_sweep / "results.jsonl").read_text())
    assert table_without_wall_time((out / "table.md").read_text()) == \
           table_without_wall_time((whole_sweep / "table.md").read_text())


def test_a_bad_shard_is_one_line_and_runs_nothing(sweep_file, fedpeft_cli_in_process, assert_user_error, tmp_path):
    proc = fedpeft_cli_in_process("sweep", "--config", str(sweep_file), "--out", str(tmp_path / "x"), "--shard", "2/2",
                       cwd=tmp_path)
    assert_user_error(proc, "--shard", "0 <= K < N")
    assert not (tmp_path / "x").exists()


def test_an_interrupted_run_with_a_corrupt_checkpoint_starts_again_instead_of_stopping_the_sweep(
        whole_sweep, sweep_file, fedpeft_cli):
    cut = whole_sweep / "fedit" / "iid" / "seed0"
    expected = json.loads((cut / "summary.json").read_text())
    (cut / "summary.json").unlink()
    latest = json.loads((cut / "checkpoint" / "latest.json").read_text())
    state = cut / "checkpoint" / latest["folder"] / "state" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])  # truncated: its digest no longer matches
    proc = fedpeft_cli("sweep", "--config", str(sweep_file), "--out", str(whole_sweep), cwd=sweep_file.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rerun = json.loads((cut / "summary.json").read_text())
    assert {k: v for k, v in rerun.items() if k != "wall_s"} == {k: v for k, v in expected.items() if k != "wall_s"}
