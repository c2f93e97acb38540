"""`flwr run .` end to end: Flower's own launcher runs fedpeft's ServerApp and ClientApp
(README, "`flwr run .`"), and a federation whose node count is not
``federation.num_nodes`` stops with a message saying how to fix it.

Each `flwr run` starts a local SuperLink, installs the app and runs Flower's
simulation (about 2.5 minutes on the 2-core CPU under load), so both are slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLWR = Path(sys.executable).with_name("flwr")
TINY_RUN_CONFIG = ('federation.num_rounds=1 model.name="tiny-bert" model.max_length=16 train.local_steps=1 '
                   "train.batch_size=8 data.max_examples_per_client=16 data.max_test_examples=16")


def stop_local_superlink(flwr_home: Path) -> None:
    """Stop the SuperLink (and what it started) that `flwr run` left running for ``flwr_home``.

    `flwr run` starts a local SuperLink in the background and leaves it for the
    next run; only the processes that carry this test's own FLWR_HOME are ours.
    """
    import psutil

    ours = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                ours.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    for proc in ours:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(ours, timeout=10)
    for proc in alive:
        proc.kill()


def flwr_run(tmp_path: Path, run_config: str, supernodes: int) -> subprocess.CompletedProcess:
    """The README's command, with this test's run config, node count and a private FLWR_HOME."""
    flwr_home = tmp_path / "flwr-home"
    env = {**os.environ, "PATH": f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_HOME": str(flwr_home), "NO_COLOR": "1"}
    try:
        return subprocess.run([str(FLWR), "run", ".", "--run-config", run_config,
                               "--federation-config", f"num-supernodes={supernodes}", "--stream"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop_local_superlink(flwr_home)


@pytest.mark.slow
def test_flwr_run_dot_runs_one_round_and_writes_the_run_folder(tmp_path, read_run):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    proc = flwr_run(tmp_path, f'{TINY_RUN_CONFIG} federation.num_clients=2 out="{out}"', supernodes=2)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    summary, metrics = read_run(out)
    assert (summary["model"], summary["num_clients"], summary["num_rounds"]) == ("tiny-bert", 2, 1)
    assert [m["round"] for m in metrics] == [0, 1]
    assert sorted(metrics[1]["clients"]) == [0, 1] and metrics[1]["failed"] == []
    # fedit sends every trainable float32 both ways to both clients.
    assert metrics[1]["bytes_up"] == metrics[1]["bytes_down"] == 2 * 4 * summary["trainable_params"]
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    for name in ("adapter/adapter_model.safetensors", "report.md", "checkpoint/latest.json"):
        assert (out / name).is_file(), name
    print(f"flwr run . took {time.perf_counter() - t0:.0f} s")


@pytest.mark.slow
def test_flwr_run_with_fewer_nodes_than_clients_stops_and_says_how_to_fix_it(tmp_path):
    out = tmp_path / "run"
    proc = flwr_run(tmp_path, f'{TINY_RUN_CONFIG} federation.num_clients=3 out="{out}"', supernodes=2)
    both = proc.stdout + proc.stderr
    assert "the federation has 2 nodes but federation.num_nodes = 3" in both, both[-3000:]
    assert 'num-supernodes=N' in both
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("nodes", [1, 3])
def test_a_grid_whose_node_count_is_not_num_nodes_is_refused_before_round_one(tmp_path, tiny_federation, nodes):
    """The same check on the in-process grid (seconds): fewer or more nodes than clients."""
    from fedpeft.client import make_client_app
    from fedpeft.validation import load_config
    from fedpeft.server.app import run_federation
    from fedpeft.server.inprocess_grid import InProcessGrid

    cfg = load_config(None, tiny_federation)
    assert cfg.federation.num_clients == 2
    with pytest.raises(RuntimeError, match=rf"the federation has {nodes} nodes but federation.num_nodes = 2 "
                                           r"\(0 means min\(federation.num_clients, clients per round\)\); start that many nodes"):
        run_federation(InProcessGrid(make_client_app(cfg), nodes), cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "adapter").exists()
