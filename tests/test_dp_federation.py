"""Differential privacy through real federations: the numbers a user would put in a paper.

Sample level: each client's reported epsilon equals an independent accountant
(Google dp-accounting's PLD, replace-one: shard sizes are public) for its own
sigma, q and steps; a target epsilon is met
by every client, closely for the one that spends most. Client level: Flower's
wrappers noise only what clients train, and the epsilon is the
sampled-without-replacement Gaussian's.
"""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld

from fedpeft.validation import load_config
from fedpeft.engine import run_engine
from fedpeft.privacy.accountants import client_level_epsilon
from fedpeft.sampling import participation
from fedpeft.runtime import runtime
from fedpeft.server.run_folder import RunFolder

# The random two-layer BERT: what is checked here is accounting and where noise lands, not accuracy.
TINY = ['model.name="tiny-bert"', "model.max_length=16", 'federation.engine="inprocess"', "federation.num_clients=4", "federation.clients_per_round=2",
        "federation.num_rounds=3", "train.local_steps=2", "train.batch_size=8", "data.max_test_examples=32",
        'data.partition="iid"']


def independent_replace_one_epsilon(sigma, q, steps, delta):
    """dp-accounting's PLD for the Poisson-subsampled Gaussian under replace-one, built here from scratch."""
    acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def run(tmp_path, name, extra):
    cfg = load_config(None, TINY + extra)
    run_engine(cfg, tmp_path / name)
    summary = json.loads((tmp_path / name / "summary.json").read_text())
    summary["run_dir"] = str(tmp_path / name)
    return cfg, summary, RunFolder(tmp_path / name).read_metrics()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    # Unequal shards (a cap on some clients only is not a knob, so use Dirichlet sizes) give unequal q.
    return run(tmp_path_factory.mktemp("dp"), "sample",
               ['dp.mode="sample"', "dp.noise_multiplier=1.3", "dp.delta=1e-4", "data.max_examples_per_client=40",
                'data.partition="natural"'])


def test_sample_level_epsilon_matches_an_independent_accountant(sample_run):
    cfg, summary, metrics = sample_run
    dp = summary["dp"]
    assert dp["unit"] == "sample" and dp["accountant"] == "pld" and dp["delta"] == 1e-4
    assert dp["relation"].startswith("replace-one example")
    assert "operating system's CSPRNG" in dp["randomness"]
    assert summary["epsilon"] == dp["epsilon"] and summary["delta"] == 1e-4
    rounds = participation(4, 2, cfg.federation.seed, 3)
    assert any(r == 0 for r in rounds.values()) or len(set(rounds.values())) > 1, "schedule too uniform to test"
    for c in range(4):
        steps = cfg.train.local_steps * rounds[c]
        q = dp["sample_rate_per_client"][str(c)]
        assert dp["steps_per_client"][str(c)] == steps
        got = dp["epsilon_per_client"][str(c)]
        if steps == 0:
            assert got == 0.0
            continue
        want = independent_replace_one_epsilon(1.3, q, steps, 1e-4)
        assert got == pytest.approx(want, rel=0.01)
    assert dp["epsilon"] == max(dp["epsilon_per_client"].values())
    # Per round: the largest epsilon so far, never decreasing, ending at the summary's.
    eps = [m["epsilon"] for m in metrics]
    assert eps[0] == 0.0 and eps == sorted(eps) and eps[-1] == pytest.approx(dp["epsilon"])
    report = (Path(summary["run_dir"]) / "report.md").read_text()
    assert "## Differential privacy" in report and f"| {dp['epsilon']:.3f} |" in report
    assert (Path(summary["run_dir"]) / "plots" / "epsilon.png").is_file()


def test_sample_level_dp_changes_training_and_keeps_the_payload(sample_run, tmp_path):
    cfg, summary, metrics = sample_run
    # The loss is computed on private data without noise: it must not reach the server.
    assert all(m["train_loss"] is None for m in metrics)
    _, plain, plain_metrics = run(tmp_path, "plain", ["data.max_examples_per_client=40", 'data.partition="natural"'])
    assert plain["epsilon"] is None and plain["dp"] is None
    assert summary["bytes_up"] == plain["bytes_up"], "DP must not change what crosses the wire"
    # One initial model: before any training both runs evaluate alike, to the bit ...
    assert (metrics[0]["accuracy"], metrics[0]["loss"]) == (plain_metrics[0]["accuracy"], plain_metrics[0]["loss"])
    # ... and after it DP-SGD's Gaussian noise has moved every number the clients train (noise that
    # missed a tensor, or a coordinate, would leave it where plain training put it).
    private, _, _ = RunFolder(summary["run_dir"]).load_checkpoint()
    public, _, _ = RunFolder(plain["run_dir"]).load_checkpoint()
    trained = {**{f"{m}/{k}": getattr(f, k) for m, f in private.factors.items() for k in "AB"}, **private.extras}
    reference = {**{f"{m}/{k}": getattr(f, k) for m, f in public.factors.items() for k in "AB"}, **public.extras}
    assert trained.keys() == reference.keys()
    for key, value in trained.items():
        assert np.mean(value == reference[key]) < 0.01, key


def test_target_epsilon_is_met_by_every_client_and_closely_by_the_worst(tmp_path):
    # A tight target: PLD on a 1e-4 grid is slow at the small sigmas a loose one needs.
    _, summary, _ = run(tmp_path, "target", ['dp.mode="sample"', "dp.target_epsilon=1.0", "dp.delta=1e-4",
                                             "data.max_examples_per_client=40"])
    dp = summary["dp"]
    assert dp["target_epsilon"] == 1.0 and dp["accountant"] == "pld"
    per_client = dp["epsilon_per_client"].values()
    assert all(e <= 1.0 for e in per_client)
    assert max(per_client) >= 0.97 * 1.0
    assert dp["planned_epsilon"] == pytest.approx(dp["epsilon"], rel=1e-6)


@pytest.fixture(scope="module")
def client_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("cdp"), "client",
               ['dp.mode="client"', 'strategy.name="ffa-lora"', "dp.noise_multiplier=0.8", "dp.max_grad_norm=0.5",
                "dp.delta=0.01", "data.max_examples_per_client=24"])


def test_client_level_epsilon_is_the_sampled_without_replacement_gaussian(client_run):
    _, summary, metrics = client_run
    dp = summary["dp"]
    assert dp["unit"] == "client" and dp["relation"] == "replace-one client"
    assert dp["sample_rate"] == 0.5 and dp["steps"] == 3
    assert dp["epsilon"] == pytest.approx(client_level_epsilon(0.8, 4, 2, 3, 0.01))
    assert [m["epsilon"] for m in metrics] == pytest.approx([client_level_epsilon(0.8, 4, 2, r, 0.01) for r in range(4)])


def test_client_level_noise_lands_on_trained_arrays_only(client_run):
    """FFA-LoRA's A carries no data: it stays exactly at its initialisation, while B is noised."""
    cfg, summary, _ = client_run
    keys = summary["dp"]["noised_arrays"]
    assert keys and all(k.startswith(("lora_B/", "extra/")) for k in keys)
    state, _, _ = RunFolder(summary["run_dir"]).load_checkpoint()
    initial = runtime(cfg).model.initial
    for m, f in state.factors.items():
        np.testing.assert_array_equal(f.A, initial.factors[m].A)
    # Noise std per coordinate is sigma * C / m = 0.8 * 0.5 / 2 = 0.2; three rounds of it dwarf
    # a few local steps' worth of B (about 1e-2).
    b = np.concatenate([f.B.ravel() for f in state.factors.values()])
    assert 0.2 < b.std() < 0.6


def test_gaussian_without_sampling_matches_opacus_rdp():
    """With every client in every round there is no amplification: a plain Gaussian at
    sigma / 2 (replace-one), which opacus's RDP (q = 1) computes independently."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(2.0 / 2.0, 1.0, 5)]
    want = acc.get_epsilon(delta=1e-3)
    assert client_level_epsilon(2.0, 10, 10, 5, 1e-3) == pytest.approx(want, rel=0.01)
    # Sampling half the clients can only help.
    assert client_level_epsilon(2.0, 10, 5, 5, 1e-3) < want


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_client_side_clipping_runs_through_flowers_client_mods(tmp_path, clipping):
    """Flower's fixedclipping_mod / adaptiveclipping_mod pair the reply's arrays with the ones sent:
    the client echoes every key it was sent, and the rule takes only what it aggregates."""
    _, summary, metrics = run(tmp_path, clipping,
                              ['dp.mode="client"', 'dp.clip_on="client"', f'dp.clipping="{clipping}"',
                               "dp.noise_multiplier=0.5", "dp.clipped_count_stddev=1.0", "dp.delta=0.01",
                               "data.max_examples_per_client=16", "federation.num_rounds=2", "train.local_steps=1"])
    assert not any(m["failed"] for m in metrics), metrics
    assert summary["dp"]["epsilon"] == pytest.approx(client_level_epsilon(0.5, 4, 2, 2, 0.01))
    assert np.isfinite(summary["final_loss"])


def test_the_dp_utility_experiment_is_a_private_run_within_its_claim():
    """experiments/dp_utility.toml (README "DP that learns"): epsilon <= 8 for every client, delta below 1/n."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "dp_utility.toml")
    rt = runtime(cfg)
    plan = rt.dp_plan
    assert plan.unit == "sample" and plan.relation == "replace-one" and plan.accountant == "pld"
    assert plan.planned_epsilon() <= 8.0
    assert cfg.dp.delta < 1.0 / max(len(s) for s in rt.shards)
    assert cfg.model.pooling == "mean" and cfg.train.optimizer == "sgd"


@pytest.mark.slow
def test_the_dp_utility_experiment_learns(tmp_path):
    """The whole run (about 15 minutes on 2 cores): at least 10 points above the majority class."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "dp_utility.toml")
    summary = run_engine(cfg, tmp_path / "run") or json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epsilon"] <= 8.0
    assert summary["final_accuracy"] >= summary["majority_baseline"] + 0.10, summary["final_accuracy"]
