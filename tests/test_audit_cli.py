"""`fedpeft audit` through the console script: on user mistakes exit code 2, one line
naming the key, nothing written; on a tiny model, the studies, the empirical canary
audit and `--sweep` run and write their reports.

Every other audit.* message is checked in-process in test_audit_metrics.py.
"""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("audit.victims=0", "audit.victims must be an integer >= 1"),
        ("audit.attacks=['nope']", "audit.attacks: 'nope' is not an attack; choose from:"),
        ("audit.dlg={iterations=-1}", "audit.dlg.iterations = -1 must be a non-negative number"),
    ],
)
def test_bad_audit_key_is_one_line_and_writes_nothing(tmp_path, override, message, fedpeft_cli_in_process,
                                                      assert_user_error):
    out = tmp_path / "audit"
    proc = fedpeft_cli_in_process("audit", "--set", override, "--out", str(out), cwd=tmp_path)
    assert_user_error(proc, message)
    assert not out.exists()


# --- `fedpeft audit` that runs: the studies, the empirical canary audit, and a sweep ------------------
# On the tiny random-weight BERT with two victims: the paths and the exact facts, not attack strength
# (a random BERT gives the span attack nothing; tests/test_audit_span.py measures it on MiniLM).

TINY_AUDIT = ['model.name="tiny-bert"', "audit.victims=2", "audit.study_victims=2", "audit.prior_examples=50"]
STUDIES = {"batch size", "sentence length", "dropout", "local steps"}


def audit_args(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def check_experiment(experiment: dict, attacks: list[str]) -> None:
    """A study point either ran on its victims with every attack scored against its baseline, or says why not."""
    if experiment.get("skipped"):
        assert experiment["victims"] == 0 and "attacks" not in experiment
        return
    assert experiment["victims"] > 0 and list(experiment["attacks"]) == attacks
    for attack in experiment["attacks"].values():
        assert attack["metrics"], experiment["name"]
        for metric in attack["metrics"].values():
            for side in ("attack", "baseline"):
                assert metric[side]["lo"] <= metric[side]["mean"] <= metric[side]["hi"]


def test_audit_runs_its_studies_and_the_empirical_canary_audit(tmp_path, fedpeft_cli):
    out = tmp_path / "audit"
    proc = fedpeft_cli("audit", *audit_args(TINY_AUDIT + ["audit.studies=true", "audit.empirical=true",
                                                          "audit.canary_trials=20"]),
                       "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "audit.json").read_text())
    attacks = result["settings"]["attacks"]
    experiments = result["experiments"]
    assert [e["name"] for e in experiments[:2]] == ["main", "positive control"]
    assert {e["study"] for e in experiments[2:]} == STUDIES
    for e in experiments:
        check_experiment(e, attacks)
    # One example per victim: its label and its head input follow exactly from the gradient.
    main = experiments[0]["attacks"]
    assert main["label-recovery"]["metrics"]["label accuracy"]["attack"]["mean"] == 1.0
    assert main["linear-inversion"]["metrics"]["cosine classifier input"]["attack"]["mean"] == pytest.approx(1.0, abs=1e-4)
    # Without DP the canary is told apart in every trial: the lower bound is the most that 20
    # trials can show, and it cannot have the power to contradict an accountant's infinity.
    empirical = result["empirical"]
    assert empirical["unit"] == "sample" and empirical["trials"] == 20
    assert empirical["epsilon_accountant"] == float("inf") and empirical["noise_multiplier"] == 0.0
    assert empirical["false_pos"] == empirical["false_neg"] == 0
    assert empirical["epsilon_lower"] == empirical["max_lower"] > 0 and not empirical["has_power"]
    report = (out / "audit.md").read_text()
    for e in experiments:
        assert f"## Experiment: {e['name']}" in report
    assert "## Empirical privacy (canary audit)" in report


TINY_AUDIT_SWEEP = """# A two-point audit sweep for the tests.
[sweep]
name = "tiny-audit-sweep"
victims = 2
full_victims = 2
base = ['model.name="tiny-bert"', "audit.studies=false", "audit.empirical=false", "audit.prior_examples=50"]

[[axis]]
name = "rank"
title = "LoRA rank"
label = "LoRA rank r"
key = "peft.r"
values = [2, 4]
"""


@pytest.mark.slow
def test_audit_sweep_runs_each_point_and_writes_table_and_plot(tmp_path, fedpeft_cli):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(TINY_AUDIT_SWEEP)
    out = tmp_path / "audit-sweep"
    proc = fedpeft_cli("audit", "--sweep", str(sweep), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "audit_sweep.json").read_text())
    assert result["name"] == "tiny-audit-sweep"
    points = result["points"]
    assert [(p["axis"], p["value"], p["rank"], p["victims"]) for p in points] == [("rank", 2, 2, 2), ("rank", 4, 4, 2)]
    for p in points:
        # batch 1: label recovery is exact at every point, and each curve has its baseline.
        assert p["metrics"]["label-recovery: label accuracy"]["attack"]["mean"] == 1.0
        assert all({"attack", "baseline"} <= m.keys() for m in p["metrics"].values())
    report = (out / "audit.md").read_text()
    assert "# Audit sweep: tiny-audit-sweep" in report and "A two-point audit sweep for the tests." in report
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and line[2].isdigit()] == ["2", "4"]
    assert (out / "plots" / "audit_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_audit_sweep_with_a_bad_axis_is_one_line_and_writes_nothing(tmp_path, fedpeft_cli_in_process, assert_user_error):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(TINY_AUDIT_SWEEP.replace('key = "peft.r"', 'key = "peft.rank"'))
    out = tmp_path / "audit-sweep"
    assert_user_error(fedpeft_cli_in_process("audit", "--sweep", str(sweep), "--out", str(out), cwd=tmp_path),
                      "peft.rank")
    assert not out.exists()
