"""`federation.eval_every` and `federation.eval_examples`: the server evaluates every k rounds, on a fixed
test subset between the first and the last round, and in full on round 0 and the last round."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.engine import run_engine
from fedpeft.server.flower_strategy import evaluated_clients
from fedpeft.server.round_recorder import eval_subset, evaluated_rounds
from fedpeft.server.run_folder import RunFolder
from fedpeft.validation import config_from_dict, load_config
from tests.conftest import without_timings

TEST_EXAMPLES = 24
TINY = ['model.name="tiny-bert"', "model.max_length=16", 'federation.engine="inprocess"', "federation.num_clients=3",
        "federation.clients_per_round=2", "federation.num_rounds=5", "train.local_steps=2", "train.batch_size=8",
        "data.max_examples_per_client=16", f"data.max_test_examples={TEST_EXAMPLES}", 'data.partition="iid"']
THINNED = ["federation.eval_every=2", "federation.eval_examples=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same federation evaluated every round in full, and thinned (every 2nd round, 10-example subset)."""
    root = tmp_path_factory.mktemp("eval")
    every = run_engine(load_config(None, TINY), root / "every")
    thinned = run_engine(load_config(None, TINY + THINNED), root / "thinned")
    return (every, RunFolder(root / "every").read_metrics()), (thinned, RunFolder(root / "thinned").read_metrics())


def test_the_schedule_is_round_zero_every_kth_and_the_last():
    assert evaluated_rounds(5, 2) == {0, 2, 4, 5}
    assert evaluated_rounds(6, 3) == {0, 3, 6}
    assert evaluated_rounds(3, 1) == {0, 1, 2, 3}
    assert evaluated_rounds(3, 10) == {0, 3}


def test_the_subset_is_fixed_seeded_and_distinct():
    first = eval_subset(10, 24, seed=0)
    assert np.array_equal(first, eval_subset(10, 24, seed=0))
    assert len(first) == len(set(first.tolist())) == 10 and first.min() >= 0 and first.max() < 24
    assert np.all(np.diff(first) > 0)
    assert not np.array_equal(first, eval_subset(10, 24, seed=1))
    assert eval_subset(0, 24, seed=0) is None and eval_subset(24, 24, seed=0) is None  # 0 or all = the whole set


def test_accuracy_is_recorded_exactly_on_the_evaluated_rounds(runs):
    (_, every), (summary, thinned) = runs
    assert [m["round"] for m in thinned] == [0, 1, 2, 3, 4, 5]
    assert [m["round"] for m in thinned if m["accuracy"] is not None] == [0, 2, 4, 5]
    assert [m["eval_examples"] for m in thinned] == [TEST_EXAMPLES, 0, 10, 0, 10, TEST_EXAMPLES]
    assert all(m["loss"] is None for m in thinned if m["accuracy"] is None)
    # A round the server does not evaluate still has its training record.
    for m, ref in zip(thinned[1:], every[1:]):
        assert m["bytes_up"] == ref["bytes_up"] > 0 and m["bytes_down"] == ref["bytes_down"] > 0
        assert m["clients"] == ref["clients"] and len(m["clients"]) == 2
        assert m["train_loss"] == ref["train_loss"] and m["failed"] == []


def test_round_zero_and_the_final_round_are_the_full_test_set(runs):
    (every_summary, every), (summary, thinned) = runs
    # Evaluation does not change training: round 0 and the final round are the reference's, on all 24 examples.
    for r in (0, 5):
        assert thinned[r]["accuracy"] == every[r]["accuracy"] and thinned[r]["loss"] == every[r]["loss"]
    assert summary["final_accuracy"] == every_summary["final_accuracy"] == thinned[-1]["accuracy"]
    assert summary["initial_accuracy"] == every_summary["initial_accuracy"]
    # In between, the accuracy is on the 10-example subset: a multiple of 1/10.
    for r in (2, 4):
        assert thinned[r]["accuracy"] * 10 == pytest.approx(round(thinned[r]["accuracy"] * 10))


def test_a_run_stopped_on_an_unevaluated_round_resumes_to_the_same_result(tmp_path, runs):
    class Stop(Exception):
        pass

    def stop_after_round_three(line):
        if line["round"] == 3:
            raise Stop

    _, (summary, thinned) = runs
    with pytest.raises(Stop):
        run_engine(load_config(None, TINY + THINNED), tmp_path / "cut", on_round=stop_after_round_three)
    resumed = run_engine(config_from_dict(RunFolder(tmp_path / "cut").checkpoint_config()), tmp_path / "cut", resume=True)
    assert without_timings(RunFolder(tmp_path / "cut").read_metrics()) == without_timings(thinned)
    assert resumed["final_accuracy"] == summary["final_accuracy"]


@pytest.mark.parametrize("override,named", [("federation.eval_every=0", "federation.eval_every"),
                                            ("federation.eval_examples=-1", "federation.eval_examples")])
def test_bad_values_are_one_line(tmp_path, fedpeft_cli_in_process, assert_user_error, override, named):
    proc = fedpeft_cli_in_process("run", "--set", override, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert_user_error(proc, named)
    assert not (tmp_path / "run").exists()


def test_client_evaluation_samples_a_fixed_set_of_clients():
    assert evaluated_clients(6, frozenset({2}), 0, seed=0) == [0, 1, 3, 4, 5]  # 0 = every client with examples
    assert evaluated_clients(6, frozenset({2}), 5, seed=0) == [0, 1, 3, 4, 5]  # the cap covers them all
    picked = evaluated_clients(100_000, frozenset({7}), 100, seed=0)
    assert len(picked) == len(set(picked)) == 100 and picked == sorted(picked) and 7 not in picked
    assert picked == evaluated_clients(100_000, frozenset({7}), 100, seed=0)
    assert picked != evaluated_clients(100_000, frozenset({7}), 100, seed=1)


def test_a_capped_client_evaluation_asks_the_same_sampled_clients_every_round(tmp_path):
    cfg = load_config(None, TINY + ["federation.num_clients=6", "federation.num_rounds=2", "federation.client_eval=true",
                                    "federation.client_eval_clients=3"])
    summary = run_engine(cfg, tmp_path / "run")
    expected = [str(c) for c in evaluated_clients(6, frozenset(), 3, seed=0)]
    lines = RunFolder(tmp_path / "run").read_metrics()
    assert [sorted(m["client_accuracy"]) for m in lines[1:]] == [expected, expected]
    assert summary["final_client_accuracy"] == pytest.approx(np.mean(list(lines[-1]["client_accuracy"].values())))
