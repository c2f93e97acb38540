"""Client failures and stragglers (federation.failure_rate, straggler_rate, round_timeout) and the round quorum
(federation.min_clients, round_retries), through real federations of the random two-layer BERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.engine import run_engine
from fedpeft.errors import FederationError
from fedpeft.privacy.secret import SecretSource
from fedpeft.sampling import sample_clients
from fedpeft.server.fault_injection import client_fault
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import load_config
from tests.conftest import TINY_FEDERATION, without_timings

# Six clients, four rounds; the faults are drawn per (round, try, client) from the seed.
BASE = [o for o in TINY_FEDERATION if not o.startswith(("federation.num_clients", "federation.num_rounds"))] + [
    "federation.num_clients=6", "federation.num_rounds=4"]
FAULTS = ["federation.failure_rate=0.3", "federation.straggler_rate=0.2", "federation.round_timeout=60"]
CRASHED = "crashed (injected: federation.failure_rate)"
LATE = "no reply within federation.round_timeout = 60 s"


def run(tmp_path: Path, *overrides: str, name: str = "run"):
    out = tmp_path / name
    summary = run_engine(load_config(None, [*BASE, *overrides]), out)
    return summary, RunFolder(out).read_metrics()


def test_fault_draws_are_seeded_per_round_try_and_client_at_the_configured_rates():
    draws = [client_fault(0.2, 0.1, r, 0, c, seed=3) for r in range(1, 101) for c in range(100)]
    assert draws == [client_fault(0.2, 0.1, r, 0, c, seed=3) for r in range(1, 101) for c in range(100)]
    assert draws.count("failure") / len(draws) == pytest.approx(0.2, abs=0.015)
    assert draws.count("straggler") / len(draws) == pytest.approx(0.1, abs=0.015)
    assert draws != [client_fault(0.2, 0.1, r, 0, c, seed=4) for r in range(1, 101) for c in range(100)]
    assert draws != [client_fault(0.2, 0.1, r, 1, c, seed=3) for r in range(1, 101) for c in range(100)]
    assert client_fault(0.0, 0.0, 1, 0, 0, seed=3) is None


def test_under_a_secret_the_draws_do_not_follow_the_public_seed():
    """Client-level DP: the public seed must not tell which clients fail (it would tell who was sampled)."""
    one, other = SecretSource(entropy=1), SecretSource(entropy=2)
    keyed = [(r, c) for r in range(1, 41) for c in range(50)]
    a = [client_fault(0.3, 0.0, r, 0, c, seed=0, secret=one) for r, c in keyed]
    assert a == [client_fault(0.3, 0.0, r, 0, c, seed=0, secret=one) for r, c in keyed]
    assert a != [client_fault(0.3, 0.0, r, 0, c, seed=0, secret=other) for r, c in keyed]
    assert a != [client_fault(0.3, 0.0, r, 0, c, seed=0) for r, c in keyed]


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory):
    """The same faulty federation on the in-process and the batched engine."""
    tmp = tmp_path_factory.mktemp("faults")
    return {engine: run(tmp, *FAULTS, "federation.min_clients=3", f'federation.engine="{engine}"', name=engine)
            for engine in ("inprocess", "batched")}


def test_every_failure_is_in_the_metrics_with_its_cause(faulty_runs):
    summary, metrics = faulty_runs["inprocess"]
    cfg = load_config(None, [*BASE, *FAULTS])
    for line in metrics[1:]:
        tries = [*line["retries"], {"attempt": len(line["retries"]), "failed": line["failed"]}]
        for t in tries:
            expected = {c: client_fault(0.3, 0.2, line["round"], t["attempt"], c, seed=cfg.federation.seed)
                        for c in range(6)}
            got = {f["client"]: f["reason"] for f in t["failed"]}
            assert got == {c: CRASHED if f == "failure" else LATE for c, f in expected.items() if f}, (line, t)
    assert sum(len(m["failed"]) for m in metrics) > 0 and summary["final_accuracy"] is not None


def test_lost_clients_are_not_aggregated(faulty_runs):
    """Bytes up count exactly the clients that answered in the try that counted (each uploads the same arrays)."""
    _, metrics = faulty_runs["inprocess"]
    per_client = {m["bytes_up"] // (6 - len(m["failed"])) for m in metrics[1:] if not m["retries"]}
    assert len(per_client) == 1
    (upload,) = per_client
    for m in metrics[1:]:
        answered = 6 - len(m["failed"]) + sum(6 - len(t["failed"]) for t in m["retries"])  # voided tries uploaded too
        assert m["bytes_up"] == answered * upload


def test_every_engine_loses_the_same_clients_and_ends_the_same(faulty_runs):
    (a, ma), (b, mb) = faulty_runs["inprocess"], faulty_runs["batched"]
    assert [m["failed"] for m in ma] == [m["failed"] for m in mb]
    assert [m["retries"] for m in ma] == [m["retries"] for m in mb]
    assert a["final_accuracy"] == b["final_accuracy"] and a["bytes_up"] == b["bytes_up"]
    np.testing.assert_allclose([m["loss"] for m in ma], [m["loss"] for m in mb], rtol=1e-4)


@pytest.mark.slow
def test_the_ray_engine_loses_the_same_clients(tmp_path, faulty_runs):
    summary, metrics = run(tmp_path, *FAULTS, "federation.min_clients=3", 'federation.engine="simulation"')
    _, reference = faulty_runs["inprocess"]
    assert [m["failed"] for m in metrics] == [m["failed"] for m in reference]
    assert [m["retries"] for m in metrics] == [m["retries"] for m in reference]


def test_a_short_round_is_run_again_with_a_fresh_sample(tmp_path):
    """Three of six sampled per round, all three needed: some tries are voided, each next try samples afresh."""
    summary, metrics = run(tmp_path, "federation.clients_per_round=3", "federation.failure_rate=0.25",
                           "federation.min_clients=3", "federation.round_retries=10")
    voided = [(m["round"], t) for m in metrics for t in m["retries"]]
    assert voided, "no round was short: pick a seed or rate that voids one"
    for r, t in voided:
        assert t["clients"] == sample_clients(6, 3, 0, r, t["attempt"]) and t["good_replies"] < 3 and t["failed"]
    for m in metrics[1:]:
        assert m["failed"] == [] and m["clients"] == sample_clients(6, 3, 0, m["round"], len(m["retries"]))
    assert summary["final_accuracy"] is not None


def test_a_round_that_never_gets_its_quorum_stops_the_run_with_one_line(tmp_path, fedpeft_cli_in_process,
                                                                        assert_user_error):
    out = tmp_path / "run"
    proc = fedpeft_cli_in_process("run", "--out", str(out), *[a for o in BASE for a in ("--set", o)],
                                  "--set", "federation.failure_rate=0.6", "--set", "federation.min_clients=6",
                                  "--set", "federation.round_retries=1", cwd=tmp_path)
    line = assert_user_error(proc, "round 1:", "federation.min_clients needs 6", "in each of 2 tries",
                             "federation.round_retries = 1", CRASHED)
    assert "checkpoint" in line
    assert not (out / "summary.json").exists()
    assert [m["round"] for m in RunFolder(out).read_metrics()] == [0]  # round 0's line and checkpoint, nothing half-way


def test_sample_level_dp_at_a_target_epsilon_refuses_to_run_a_round_again(tmp_path):
    with pytest.raises(FederationError, match="round 1: .* A try again is refused: the DP-SGD noise is calibrated"):
        run(tmp_path, 'dp.mode="sample"', "dp.target_epsilon=8", "dp.delta=1e-3", "federation.failure_rate=0.6",
            "federation.min_clients=6")


def test_under_client_level_dp_faults_are_listed_without_clients_and_rejections_not_at_all(tmp_path):
    """Who was sampled is secret, and why an update was rejected is computed from it: neither is released."""
    secret = tmp_path / "secret"
    secret.write_text("a long secret for the test")
    dp = ['dp.mode="client"', "dp.noise_multiplier=0.8", "dp.max_grad_norm=0.5", "dp.delta=0.01",
          f'dp.secret_file="{secret}"']
    hostile = ["federation.byzantine_fraction=0.2", "federation.byzantine_strength=1000",
               "federation.max_update_norm=1.0"]
    _, plain = run(tmp_path, *hostile, "train.lr=0.01", name="plain")
    assert any("exceeds federation.max_update_norm" in f["reason"] for m in plain for f in m["failed"])
    _, metrics = run(tmp_path, *dp, *hostile, "train.lr=0.01", "federation.failure_rate=0.3", name="dp")
    failed = [f for m in metrics for f in m["failed"]]
    assert failed and all(f == {"reason": CRASHED} for f in failed)
    assert all(m["clients"] is None for m in metrics)


def test_a_run_with_faults_and_retries_resumes_to_the_run_that_never_stopped(tmp_path, monkeypatch):
    from tests.test_crash_safety import Killed, cut_at

    overrides = ["federation.clients_per_round=3", "federation.failure_rate=0.25", "federation.min_clients=3",
                 "federation.round_retries=10"]
    whole, whole_metrics = run(tmp_path, *overrides, name="whole")
    cut_at(monkeypatch, RunFolder, "save_checkpoint", 3, when="after")  # after round 2's checkpoint
    with pytest.raises(Killed):
        run(tmp_path, *overrides, name="cut")
    monkeypatch.undo()
    resumed = run_engine(load_config(None, [*BASE, *overrides]), tmp_path / "cut", resume=True)
    assert without_timings(RunFolder(tmp_path / "cut").read_metrics()) == without_timings(whole_metrics)
    for key in ("final_accuracy", "final_loss", "bytes_up", "bytes_down"):
        assert resumed[key] == whole[key]


@pytest.mark.parametrize("overrides,named", [
    (["federation.straggler_rate=0.1"], ["federation.straggler_rate", "federation.round_timeout"]),
    (["federation.failure_rate=0.6", "federation.straggler_rate=0.4", "federation.round_timeout=5"],
     ["federation.failure_rate + federation.straggler_rate", "below 1"]),
    (["federation.min_clients=7"], ["federation.min_clients = 7", "1..6"]),
    (["federation.failure_rate=1.5"], ["federation.failure_rate"]),
])
def test_fault_settings_that_cannot_work_are_config_errors(tmp_path, overrides, named, fedpeft_cli_in_process,
                                                            assert_user_error):
    proc = fedpeft_cli_in_process("run", "--out", str(tmp_path / "run"), *[a for o in BASE + overrides
                                                                           for a in ("--set", o)], cwd=tmp_path)
    assert_user_error(proc, *named)
    assert not (tmp_path / "run").exists()


def test_sweep_conditions_are_columns_with_folders_of_their_own(tmp_path):
    from fedpeft.errors import ConfigError
    from fedpeft.sweep import load_sweep

    path = Path(__file__).resolve().parents[1] / "experiments" / "faults.toml"
    _, runs, _ = load_sweep(path)
    assert {r.column for r in runs} == {"no faults", "20% failures", "20% failures, quorum 8"}
    assert len({r.folder for r in runs}) == len(runs) == 9
    assert all(("federation.failure_rate=0.2" in r.overrides) == (r.condition != "no faults") for r in runs)
    bad = tmp_path / "bad.toml"
    bad.write_text('[sweep]\nname = "x"\n[sweep.conditions]\n"a" = "federation.failure_rate=0.2"\n')
    with pytest.raises(ConfigError, match="sweep.conditions.'a'"):
        load_sweep(bad)
    bad.write_text('[sweep]\nname = "x"\n[sweep.conditions]\n"a b" = []\n"a-b" = []\n')
    with pytest.raises(ConfigError, match="share the folder name"):
        load_sweep(bad)
    assert json.loads(json.dumps([r.condition for r in runs]))  # plain strings, as results.jsonl stores them
