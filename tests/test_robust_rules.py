"""One hostile client moves the global adapter arbitrarily far under FedIT, a bounded amount under the robust rules.

Seven honest clients send small updates of the global factors; an eighth
sends its honest update scaled by 100 or 10,000, or sign-flipped and
enlarged. Under FedIT the global effective update follows the attack (100x
further at the larger scale); under the coordinate-wise median and trimmed
mean every coordinate stays within the honest clients' range, and under
norm-bounded FedIT the hostile pull is at most its weight times the bound,
whatever the scale.
"""

from __future__ import annotations

import numpy as np
import pytest

import strategies
from strategies import ClientUpdate, LoRAFactors
from strategies.trimmed_mean import trimmed_mean

RANK, IN, OUT, HONEST = 4, 12, 10, 7
MODULES = ("q", "v")


def start(name: str, **params):
    rule = strategies.get(name).from_params(params)
    rng = np.random.default_rng(0)
    factors = {m: LoRAFactors(rng.normal(0, 0.3, (RANK, IN)), rng.normal(0, 0.3, (OUT, RANK)), 2.0) for m in MODULES}
    return rule, rule.initialize(factors, extras={"head": rng.normal(0, 0.3, (2, OUT))})


def honest_update(state, cid: int) -> ClientUpdate:
    rng = np.random.default_rng(10 + cid)
    factors = {m: LoRAFactors(f.A + rng.normal(0, 0.01, f.A.shape), f.B + rng.normal(0, 0.01, f.B.shape), f.scaling)
               for m, f in state.factors.items()}
    return ClientUpdate(str(cid), factors, 20, {"head": state.extras["head"] + rng.normal(0, 0.01, (2, OUT))})


def hostile(state, attack: str, scale: float) -> ClientUpdate:
    honest = honest_update(state, HONEST)
    k = scale if attack == "scale" else -scale

    def push(new, old):
        return old + k * (new - old)

    factors = {m: LoRAFactors(push(f.A, state.factors[m].A), push(f.B, state.factors[m].B), f.scaling)
               for m, f in honest.factors.items()}
    return ClientUpdate(str(HONEST), factors, 20, {"head": push(honest.extras["head"], state.extras["head"])})


def effective(state) -> np.ndarray:
    return np.concatenate([state.effective_delta(m).ravel() for m in MODULES] + [state.extras["head"].ravel()])


def shift(name: str, attack: str, scale: float, **params) -> float:
    """How far the hostile client moves the aggregate from the one it gives when that client is honest."""
    rule, state = start(name, **params)
    honest = [honest_update(state, c) for c in range(HONEST)]
    attacked = rule.aggregate(state, honest + [hostile(state, attack, scale)])
    clean = rule.aggregate(state, honest + [honest_update(state, HONEST)])
    return float(np.linalg.norm(effective(attacked) - effective(clean)))


@pytest.mark.parametrize("attack", ["scale", "sign-flip"])
def test_fedit_follows_the_attack_the_robust_rules_do_not(attack):
    small, large = 1e2, 1e4
    fedit = [shift("fedit", attack, s) for s in (small, large)]
    assert fedit[1] > 50 * fedit[0] and fedit[1] > 1e3  # arbitrarily far: the shift grows with the attack
    for name, params in [("median", {}), ("trimmed-mean", {"trim": 0.2}), ("norm-bounded-fedit", {"max_norm": 0.5})]:
        robust = [shift(name, attack, s, **params) for s in (small, large)]
        assert robust[1] < 1.0 and robust[1] <= 1.5 * robust[0] + 1e-9, (name, robust)  # bounded, whatever the scale


@pytest.mark.parametrize("name,params", [("median", {}), ("trimmed-mean", {"trim": 0.2})])
def test_every_coordinate_stays_within_the_honest_clients_range(name, params):
    rule, state = start(name, **params)
    honest = [honest_update(state, c) for c in range(HONEST)]
    new = rule.aggregate(state, honest + [hostile(state, "scale", 1e4)])
    for m in MODULES:
        values = np.stack([u.factors[m].delta(np.float64) for u in honest])
        got = new.effective_delta(m)
        assert np.all(got >= values.min(0) - 1e-9) and np.all(got <= values.max(0) + 1e-9)
        # The statistic is represented exactly: rank-r factors for the clients plus the residual.
        stacked = np.stack([u.factors[m].delta(np.float64) for u in honest + [hostile(state, "scale", 1e4)]])
        want = np.median(stacked, axis=0) if name == "median" else trimmed_mean(stacked, 0.2)
        np.testing.assert_allclose(got, want, atol=1e-10)
        assert new.factors[m].rank == RANK


def test_norm_bounded_fedit_moves_at_most_the_hostile_weight_times_the_bound():
    bound = 0.5
    rule, state = start("norm-bounded-fedit", max_norm=bound)
    honest = [honest_update(state, c) for c in range(HONEST)]
    attacked = rule.aggregate(state, honest + [hostile(state, "scale", 1e4)])
    clean = rule.aggregate(state, honest + [honest_update(state, HONEST)])
    weight = 1 / (HONEST + 1)
    moved = np.concatenate([np.concatenate([(attacked.factors[m].A - clean.factors[m].A).ravel(),
                                            (attacked.factors[m].B - clean.factors[m].B).ravel()]) for m in MODULES]
                           + [(attacked.extras["head"] - clean.extras["head"]).ravel()])
    assert np.linalg.norm(moved) <= weight * 2 * bound + 1e-9  # its clipped update and the honest one it replaced
    # Honest updates inside the bound are averaged exactly as FedIT averages them.
    fedit, state2 = start("fedit")
    np.testing.assert_allclose(effective(rule.aggregate(state, honest)), effective(fedit.aggregate(state2, honest)))


def test_trimmed_mean_keeps_at_least_one_value_and_rejects_a_bad_trim():
    x = np.arange(5.0)[:, None]
    assert trimmed_mean(x, 0.0)[0] == 2.0 and trimmed_mean(x, 0.2)[0] == 2.0 and trimmed_mean(x, 0.49)[0] == 2.0
    assert trimmed_mean(np.array([[1.0], [100.0]]), 0.4)[0] == 50.5  # two clients: nothing can be trimmed
    with pytest.raises(ValueError, match=r"strategy.trim must be in \[0, 0.5\)"):
        strategies.get("trimmed-mean").from_params({"trim": 0.5})
    with pytest.raises(ValueError, match="strategy.max_norm must be a positive number"):
        strategies.get("norm-bounded-fedit").from_params({"max_norm": 0})
