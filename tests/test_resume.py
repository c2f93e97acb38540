"""`fedpeft run --resume`: an interrupted run finished later equals a run that never stopped."""

from __future__ import annotations

import json

import pytest

from fedpeft.validation import config_from_dict, load_config
from fedpeft.engine import run_engine
from fedpeft.server.run_folder import RunFolder
from tests.conftest import without_timings

TINY = ['federation.engine="inprocess"', "federation.num_clients=3", "federation.clients_per_round=2",
        "federation.num_rounds=3", "train.local_steps=2", "train.batch_size=8", "data.max_examples_per_client=24",
        "data.max_test_examples=32"]


class Stop(Exception):
    pass


def assert_same_outputs(cut, whole):
    """The exported adapter and the last checkpointed state, byte for byte."""
    assert (cut / "adapter/adapter_model.safetensors").read_bytes() == \
        (whole / "adapter/adapter_model.safetensors").read_bytes()
    states = [RunFolder(d).checkpoint_state_dir() / "state.safetensors" for d in (cut, whole)]
    assert states[0].read_bytes() == states[1].read_bytes()


def stop_after_round_one(line):
    if line["round"] == 1:
        raise Stop


SAMPLE_DP = ['dp.mode="sample"', "dp.delta=1e-3", "dp.noise_multiplier=1.5"]
CLIENT_DP = ['dp.mode="client"', 'dp.clipping="adaptive"', "dp.clipped_count_stddev=1.0", "dp.noise_multiplier=0.5",
             "dp.delta=0.1"]


BATCHED = ['federation.engine="batched"']
FAULTS = ["federation.failure_rate=0.3", "federation.min_clients=2", "federation.round_retries=5"]


@pytest.mark.parametrize("strategy,extra", [("fedit", []), ("fedex-lora", []), ("fedex-lora", SAMPLE_DP),
                                            ("ffa-lora", CLIENT_DP), ("fedit", BATCHED + FAULTS),
                                            ("fedex-lora", BATCHED + SAMPLE_DP)],
                         ids=["fedit", "fedex-lora", "sample-dp", "client-dp-adaptive", "batched-faults",
                              "batched-sample-dp"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, strategy, extra):
    """DP included: each client's accountant (a fresh process would lose it) and the
    adaptive clipping norm continue where the checkpoint left them. DP randomness is secret:
    bit-for-bit equality needs the user's secret (dp.secret_file), from which every round's
    noise, Poisson draws and sampling follow."""
    if extra:
        (tmp_path / "secret").write_text("a secret only the user has")
        extra = extra + [f'dp.secret_file="{tmp_path / "secret"}"']
    cfg = load_config(None, TINY + [f'strategy.name="{strategy}"'] + extra)
    run_engine(cfg, tmp_path / "whole")
    with pytest.raises(Stop):
        run_engine(cfg, tmp_path / "cut", on_round=stop_after_round_one)
    assert not (tmp_path / "cut/summary.json").exists()
    resumed_cfg = config_from_dict(RunFolder(tmp_path / "cut").checkpoint_config())
    run_engine(resumed_cfg, tmp_path / "cut", resume=True)
    whole, cut = RunFolder(tmp_path / "whole").read_metrics(), RunFolder(tmp_path / "cut").read_metrics()
    assert [m["round"] for m in cut] == [0, 1, 2, 3]
    assert without_timings(cut) == without_timings(whole)
    assert_same_outputs(tmp_path / "cut", tmp_path / "whole")
    s_whole, s_cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("whole", "cut"))
    assert {k: v for k, v in s_cut.items() if k not in ("wall_s", "config")} == \
           {k: v for k, v in s_whole.items() if k not in ("wall_s", "config")}


def test_resume_refuses_finished_missing_and_mixed_arguments(tmp_path, fedpeft_cli_in_process, assert_user_error):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    cases = [
        (["run", "--resume", str(done)], "already finished"),
        (["run", "--resume", str(tmp_path / "nope")], "no such run folder"),
        (["run", "--resume", str(tmp_path)], "not a resumable run folder"),
        (["run", "--resume", str(done), "--set", "train.lr=0.1"], "leave out --config, --set and --out"),
    ]
    for args, needle in cases:
        assert_user_error(fedpeft_cli_in_process(*args, cwd=tmp_path), needle)


# The interrupted half, in a fresh process of its own (as every `fedpeft run` is): it stops
# from the round hook once round 1 is checkpointed.
STOP_AFTER_ROUND_ONE = """
import json, sys
from fedpeft.validation import load_config
from fedpeft.engine import run_engine

class Stop(Exception):
    pass

def stop(line):
    if line["round"] == 1:
        raise Stop("stopped after round 1")

run_engine(load_config(None, json.loads(sys.argv[1])), sys.argv[2], on_round=stop)
"""


@pytest.mark.slow
def test_resumed_run_on_the_simulation_engine_equals_uninterrupted_run(tmp_path, tiny_federation, fedpeft_cli):
    """The same on Flower's simulation engine (Ray workers, each with its own resident model),
    each part in its own process: `fedpeft run`, a run stopped after round 1, `fedpeft run --resume`.
    Three Ray starts: a few minutes on the 2-core CPU."""
    import subprocess
    import sys

    tiny = [o for o in tiny_federation if not o.startswith(("federation.engine", "federation.num_rounds"))]
    overrides = tiny + ['federation.engine="simulation"', "federation.num_rounds=2", "train.local_steps=2",
                        "federation.num_clients=3", "federation.clients_per_round=2"]
    whole = fedpeft_cli("run", "--out", str(tmp_path / "whole"), *[a for o in overrides for a in ("--set", o)],
                        cwd=tmp_path, timeout=900)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    cut = subprocess.run([sys.executable, "-c", STOP_AFTER_ROUND_ONE, json.dumps(overrides), str(tmp_path / "cut")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert cut.returncode != 0 and "stopped after round 1" in cut.stderr, cut.stderr[-3000:]
    assert not (tmp_path / "cut/summary.json").exists()
    resumed = fedpeft_cli("run", "--resume", str(tmp_path / "cut"), cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert RunFolder(tmp_path / "cut").checkpoint_config()["federation"]["engine"] == "simulation"
    whole_metrics, cut_metrics = RunFolder(tmp_path / "whole").read_metrics(), RunFolder(tmp_path / "cut").read_metrics()
    assert [m["round"] for m in cut_metrics] == [0, 1, 2]
    assert without_timings(cut_metrics) == without_timings(whole_metrics)
    assert_same_outputs(tmp_path / "cut", tmp_path / "whole")
