"""federation.ray_address: the simulation engine's client workers on an existing Ray cluster.

A local cluster of two Ray nodes (a head and a worker, one CPU each) on
loopback stands in for machines: the run must use both nodes and give the
run a Ray started on this machine gives. Slow: two Ray clusters start.
"""

from __future__ import annotations

import pytest

from fedpeft.engine import run_engine, simulation_backend_config
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import load_config
from tests.conftest import TINY_FEDERATION, without_timings

OVERRIDES = [o for o in TINY_FEDERATION if not o.startswith("federation.engine")] + [
    'federation.engine="simulation"', "federation.num_rounds=2"]


def test_a_ray_address_connects_instead_of_starting_ray():
    local = simulation_backend_config(load_config(None, OVERRIDES))["init_args"]
    remote = simulation_backend_config(load_config(None, [*OVERRIDES, 'federation.ray_address="10.0.0.5:6379"']))
    assert "num_cpus" in local and "address" not in local
    assert remote["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in remote["init_args"]


@pytest.mark.slow
def test_a_simulation_on_a_two_node_ray_cluster_equals_one_on_a_local_ray(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    local = run_engine(load_config(None, OVERRIDES), tmp_path / "local")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = load_config(None, [*OVERRIDES, f'federation.ray_address="{cluster.address}"'])
        seen = []

        def on_round(line):  # while the workers are up: two one-CPU workers fill both one-CPU nodes
            alive = sum(n["Alive"] for n in ray.nodes())
            seen.append((alive, ray.cluster_resources().get("CPU"), ray.available_resources().get("CPU", 0.0)))

        remote = run_engine(cfg, tmp_path / "remote", on_round=on_round)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    assert seen and all(alive == 2 and total == 2.0 for alive, total, _ in seen), seen
    assert any(free == 0.0 for _, _, free in seen), seen  # both nodes' CPUs held by client workers
    assert without_timings(RunFolder(tmp_path / "remote").read_metrics()) == \
        without_timings(RunFolder(tmp_path / "local").read_metrics())
    assert remote["final_accuracy"] == local["final_accuracy"]
