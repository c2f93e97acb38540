"""The canary audit: Clopper-Pearson bounds, and an empirical epsilon that never exceeds
the accountant's for fedpeft's sample-level (DP-SGD) and client-level (central DP)
mechanisms, tight enough to be clearly positive with little noise, and large enough
to expose a mechanism that is claimed to be noisier than it is."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft.audit.empirical import (
    audit_scores,
    client_level_audit,
    clopper_pearson_upper,
    epsilon_lower_bound,
    sample_level_audit,
)

TRIALS = 600


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clopper_pearson_upper_bound():
    # No errors in n trials: the bound solves (1 - p)^n = alpha.
    assert clopper_pearson_upper(0, 100, 0.025) == pytest.approx(1 - 0.025 ** (1 / 100))
    assert clopper_pearson_upper(100, 100, 0.025) == 1.0
    assert clopper_pearson_upper(30, 100, 0.025) > 0.30
    assert clopper_pearson_upper(30, 1000, 0.025) < clopper_pearson_upper(3, 100, 0.025)


def test_epsilon_lower_bound_is_zero_for_guessing_and_grows_with_separation():
    assert epsilon_lower_bound(250, 500, 250, 500, 1e-5) == 0.0
    weak, strong = epsilon_lower_bound(100, 500, 100, 500, 1e-5), epsilon_lower_bound(5, 500, 5, 500, 1e-5)
    assert 0.0 < weak < strong
    # Perfect separation on n trials per side: limited by n alone.
    assert epsilon_lower_bound(0, 500, 0, 500, 1e-5) == pytest.approx(math.log((1 - 1e-5 - (1 - 0.025 ** (1 / 500)))
                                                                               / (1 - 0.025 ** (1 / 500))))


def test_threshold_is_chosen_on_one_half_and_scored_on_the_other():
    # Perfectly separated on the first half, swapped on the second: judged on the first half the
    # threshold looks perfect; the held-out half shows it is wrong every time, and the bound is 0.
    scores_in = [1.0] * 50 + [0.0] * 50
    scores_out = [0.0] * 50 + [1.0] * 50
    lower, threshold, fp, fn = audit_scores(scores_in, scores_out, 1e-5)
    assert 0.0 <= threshold < 1.0 and fp == 50 and fn == 50
    assert lower == 0.0
    # The same scores in an order where both halves agree give a clearly positive bound.
    assert audit_scores([1.0] * 100, [0.0] * 100, 1e-5)[0] > 2.0


@pytest.mark.parametrize("sigma", [0.5, pytest.param(1.0, marks=[pytest.mark.slow, pytest.mark.ci]),
                                   pytest.param(4.0, marks=pytest.mark.slow)])
def test_sample_level_lower_bound_never_exceeds_the_accountant(sigma):
    audit = sample_level_audit(sigma, 1.0, trials=TRIALS, seed=1)
    assert audit.epsilon_lower <= audit.epsilon_accountant, audit
    if sigma == 0.5:  # little noise: the audit is tight-ish, clearly above zero
        assert audit.epsilon_lower > 1.5, audit


def test_sample_level_two_steps_stay_below_the_accountant():
    audit = sample_level_audit(0.8, 0.5, steps=2, trials=TRIALS, seed=2)
    assert 0.5 < audit.epsilon_lower <= audit.epsilon_accountant, audit


@pytest.mark.parametrize(("sigma", "per_round"), [(0.5, 10), *(pytest.param(*p, marks=pytest.mark.slow) for p in [(1.0, 10), (3.0, 10), (0.5, 5)])])
def test_client_level_lower_bound_never_exceeds_the_accountant(sigma, per_round):
    audit = client_level_audit(sigma, 1.0, num_clients=10, clients_per_round=per_round, trials=TRIALS, seed=3)
    assert audit.epsilon_lower <= audit.epsilon_accountant, audit
    if (sigma, per_round) == (0.5, 10):
        assert audit.epsilon_lower > 1.0, audit


def test_a_mechanism_noisier_on_paper_than_in_fact_is_caught():
    # The bug a violation reveals: accounting for sigma = 8 while running sigma = 0.5. The gap is
    # wide (lower bounds 1.3-1.9 against 0.48 at 150 trials), so fewer trials than the tight tests.
    sample = sample_level_audit(0.5, 1.0, trials=200, seed=4, claimed_noise_multiplier=8.0)
    assert sample.epsilon_lower > sample.epsilon_accountant, sample
    client = client_level_audit(0.5, 1.0, trials=200, seed=4, claimed_noise_multiplier=16.0)
    assert client.epsilon_lower > client.epsilon_accountant, client
