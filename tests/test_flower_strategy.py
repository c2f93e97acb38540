"""The Flower adapter's pure parts: seeded client sampling and the aggregation error."""

import numpy as np
import pytest

import strategies
from fedpeft.server.flower_strategy import aggregation_error, sample_clients
from strategies import ClientUpdate, LoRAFactors


def test_sampling_is_seeded_sorted_and_changes_by_round():
    draws = [sample_clients(10, 3, seed=0, server_round=r) for r in range(1, 6)]
    assert draws == [sample_clients(10, 3, seed=0, server_round=r) for r in range(1, 6)]
    assert all(d == sorted(d) and len(set(d)) == 3 and all(0 <= c < 10 for c in d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1
    assert sample_clients(10, 3, seed=1, server_round=1) != draws[0] or sample_clients(10, 3, 1, 2) != draws[1]
    assert sample_clients(4, 4, seed=0, server_round=1) == [0, 1, 2, 3]


def random_round(rng, clients=3, d_out=6, d_in=5, r=2, s=2.0):
    state_factors = {"m": LoRAFactors(A=rng.normal(size=(r, d_in)).astype(np.float32), B=np.zeros((d_out, r), np.float32), scaling=s)}
    updates = [ClientUpdate(str(i), {"m": LoRAFactors(A=rng.normal(size=(r, d_in)).astype(np.float32),
                                                      B=rng.normal(size=(d_out, r)).astype(np.float32), scaling=s)},
                            num_examples=int(rng.integers(1, 50))) for i in range(clients)]
    return state_factors, updates


@pytest.mark.parametrize("name", ["fedit", "fedex-lora"])
def test_aggregation_error_is_the_covariance_term_for_fedit_and_zero_when_exact(name):
    rng = np.random.default_rng(0)
    factors, updates = random_round(rng)
    rule = strategies.get(name)()
    before = rule.initialize(factors)
    after = rule.aggregate(before, updates)
    w = rule.weights(updates)
    err = aggregation_error(before, after, updates, w)
    exact = sum(p * u.factors["m"].delta(np.float64) for p, u in zip(w, updates))
    if name == "fedex-lora":
        assert err < 1e-6
    else:
        A = sum(p * u.factors["m"].A.astype(np.float64) for p, u in zip(w, updates))
        B = sum(p * u.factors["m"].B.astype(np.float64) for p, u in zip(w, updates))
        cov = sum(p * 2.0 * (u.factors["m"].B - B) @ (u.factors["m"].A - A) for p, u in zip(w, updates))
        assert err == pytest.approx(np.linalg.norm(cov) / np.linalg.norm(exact), rel=1e-4)
        assert err > 0.01
