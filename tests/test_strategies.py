"""Tests of the strategy contract, the registry, checkpoints and FedIT."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

import strategies  # noqa: E402
from strategies import ClientUpdate, LoRAFactors, Payload, ServerState, Strategy  # noqa: E402
from strategies.testing import assert_states_equal, check_strategy, random_factors  # noqa: E402

FedIT = strategies.get("fedit")


def make_round(rng, k, d_out, d_in, r, scaling=2.0, dtype=np.float64, ns=None):
    """A round-0 state and k client updates for one module 'm' plus a head."""
    init = random_factors(rng, d_out, d_in, r, scaling, dtype)
    head = {"head.weight": rng.standard_normal((2, d_out)).astype(dtype)}
    state = FedIT().initialize({"m": init}, extras=head)
    ns = ns if ns is not None else [int(n) for n in rng.integers(1, 50, size=k)]
    updates = [
        ClientUpdate(
            client_id=str(i),
            factors={"m": random_factors(rng, d_out, d_in, r, scaling, dtype)},
            num_examples=ns[i],
            extras={"head.weight": rng.standard_normal((2, d_out)).astype(dtype)},
        )
        for i in range(k)
    ]
    return state, updates


def weights_of(ns):
    n = np.asarray(ns, dtype=np.float64)
    return n / n.sum() if n.sum() > 0 else np.full(len(n), 1 / len(n))


# --- FedIT math ---------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 5),
    d_out=st.integers(1, 6),
    d_in=st.integers(1, 6),
    r=st.integers(1, 4),
    scaling=st.floats(0.1, 4.0),
    ns=st.lists(st.integers(0, 50), min_size=5, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_fedit_averages_factors_and_error_is_covariance(k, d_out, d_in, r, scaling, ns, seed):
    rng = np.random.default_rng(seed)
    state, updates = make_round(rng, k, d_out, d_in, r, scaling, ns=ns[:k])
    p = weights_of(ns[:k])
    new = FedIT().aggregate(state, updates)
    A, B = new.factors["m"].A, new.factors["m"].B
    Ai = [u.factors["m"].A for u in updates]
    Bi = [u.factors["m"].B for u in updates]
    np.testing.assert_allclose(A, sum(pi * a for pi, a in zip(p, Ai)), atol=1e-12)
    np.testing.assert_allclose(B, sum(pi * b for pi, b in zip(p, Bi)), atol=1e-12)
    np.testing.assert_allclose(
        new.extras["head.weight"], sum(pi * u.extras["head.weight"] for pi, u in zip(p, updates)), atol=1e-12
    )
    exact_mean = sum(pi * scaling * b @ a for pi, a, b in zip(p, Ai, Bi))
    error = exact_mean - new.effective_delta("m")
    covariance = scaling * sum(pi * (b - B) @ (a - A) for pi, a, b in zip(p, Ai, Bi))
    np.testing.assert_allclose(error, covariance, atol=1e-9)
    assert new.round == 1 and new.factors["m"].scaling == scaling


def test_fedit_folds_different_scalings_into_B():
    rng = np.random.default_rng(1)
    state, updates = make_round(rng, 3, 4, 5, 2)
    for u, s in zip(updates, [0.5, 2.0, 3.0]):
        u.factors["m"].scaling = s
    new = FedIT().aggregate(state, updates)
    p = weights_of([u.num_examples for u in updates])
    f = new.factors["m"]
    assert f.scaling == 2.0  # the server's scaling is kept
    fs = [u.factors["m"] for u in updates]
    np.testing.assert_allclose(f.scaling * f.B, sum(pi * fi.scaling * fi.B for pi, fi in zip(p, fs)))
    # generalised error formula: sum p_i (s_i B_i - s B)(A_i - A)
    exact_mean = sum(pi * fi.delta() for pi, fi in zip(p, fs))
    cov = sum(pi * (fi.scaling * fi.B - f.scaling * f.B) @ (fi.A - f.A) for pi, fi in zip(p, fs))
    np.testing.assert_allclose(exact_mean - new.effective_delta("m"), cov, atol=1e-10)


def test_zero_examples_gives_equal_weights_and_float32_stays_float32():
    rng = np.random.default_rng(2)
    state, updates = make_round(rng, 3, 4, 5, 2, dtype=np.float32, ns=[0, 0, 0])
    new = FedIT().aggregate(state, updates)
    A = new.factors["m"].A
    assert A.dtype == np.float32 and np.all(np.isfinite(A))
    np.testing.assert_allclose(A, np.mean([u.factors["m"].A for u in updates], axis=0), rtol=1e-6)


def test_aggregate_rejects_bad_input():
    rng = np.random.default_rng(3)
    state, updates = make_round(rng, 2, 4, 5, 2)
    with pytest.raises(ValueError, match="at least one"):
        FedIT().aggregate(state, [])
    with pytest.raises(ValueError, match="two updates"):
        FedIT().aggregate(state, [updates[0], updates[0]])
    bad = ClientUpdate("9", {"nope": updates[0].factors["m"]}, 1)
    with pytest.raises(ValueError, match="unknown module 'nope'"):
        FedIT().aggregate(state, [bad])
    low = ClientUpdate("9", {"m": LoRAFactors(np.ones((1, 5)), np.ones((4, 1)), 2.0)}, 1)
    with pytest.raises(ValueError, match="rank 1"):
        FedIT().aggregate(state, [low])
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRAFactors(np.ones((2, 5)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="num_examples"):
        ClientUpdate("1", {}, -1)


def test_aggregate_does_not_mutate_or_alias_inputs():
    rng = np.random.default_rng(4)
    state, updates = make_round(rng, 3, 4, 5, 2)
    state.residuals["m"] = rng.standard_normal((4, 5))
    before = state.copy()
    before_updates = [ServerState(factors={"m": u.factors["m"].copy()}) for u in updates]
    new = FedIT().aggregate(state, updates)
    assert_states_equal(state, before)
    for u, b in zip(updates, before_updates):
        assert_states_equal(ServerState(factors=u.factors), b)
    inputs = [state.residuals["m"], state.factors["m"].A, state.factors["m"].B, *state.extras.values()]
    inputs += [a for u in updates for a in (u.factors["m"].A, u.factors["m"].B, *u.extras.values())]
    outputs = [new.residuals["m"], new.factors["m"].A, new.factors["m"].B, *new.extras.values()]
    assert not any(np.shares_memory(o, i) for o in outputs for i in inputs)


def test_update_order_does_not_matter():
    rng = np.random.default_rng(5)
    state, updates = make_round(rng, 4, 3, 3, 2, dtype=np.float32)
    assert_states_equal(FedIT().aggregate(state, updates), FedIT().aggregate(state, updates[::-1]))


# --- state: effective delta, checkpoints, payloads -----------------------------

def rich_state(rng) -> ServerState:
    def f(d_out, d_in, r, s, dtype=np.float32):
        return random_factors(rng, d_out, d_in, r, s, dtype)

    return ServerState(
        # odd names, mixed dtypes, rank 0, a 0-d and a non-contiguous array
        factors={"layer.0/q:proj": f(4, 3, 2, 1 / 3), "v": f(2, 5, 1, 0.1, np.float64), "empty": f(3, 2, 0, 1.0)},
        residuals={"v": rng.standard_normal((5, 2)).T},
        extras={"head.bias": rng.standard_normal(2).astype(np.float32), "scalar": np.array(3.5)},
        client_factors={"7": {"v": f(2, 5, 3, 0.7, np.float64)}, "x/y": {}},
        round=5,
        meta={"ranks": {"7": 3}, "note": "ü", "xs": [1, 2.5, None]},
    )


def test_effective_delta_includes_residuals_and_client_factors():
    state = rich_state(np.random.default_rng(6))
    g, c = state.factors["v"], state.client_factors["7"]["v"]
    np.testing.assert_allclose(state.effective_delta("v"), state.residuals["v"] + g.scaling * g.B @ g.A)
    np.testing.assert_allclose(
        state.effective_delta("v", client_id="7"), state.residuals["v"] + c.scaling * c.B @ c.A
    )
    np.testing.assert_array_equal(state.effective_delta("v", client_id="unknown"), state.effective_delta("v"))
    np.testing.assert_array_equal(state.effective_delta("empty"), np.zeros((3, 2)))
    only_residual = ServerState(residuals={"w": np.ones((2, 2))})
    np.testing.assert_array_equal(only_residual.effective_delta("w"), np.ones((2, 2)))
    with pytest.raises(KeyError, match="unknown module"):
        state.effective_delta("nope")


def test_checkpoint_round_trip_is_exact(tmp_path):
    state = rich_state(np.random.default_rng(7))
    state.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["state.json", "state.safetensors"]
    loaded = ServerState.load(tmp_path / "ckpt")
    assert_states_equal(state, loaded)
    assert loaded.factors["layer.0/q:proj"].scaling == 1 / 3
    loaded.save(tmp_path / "ckpt")  # overwriting works too
    assert_states_equal(state, ServerState.load(tmp_path / "ckpt"))
    with pytest.raises(FileNotFoundError):
        ServerState.load(tmp_path / "missing")


def test_payload_and_upload_bytes_are_the_arrays_sent():
    rng = np.random.default_rng(8)
    state, updates = make_round(rng, 2, 4, 5, 2, dtype=np.float32)
    state.residuals["m"] = np.zeros((4, 5), np.float32)
    s = FedIT()
    payload = s.payload_for(state, "0")
    assert payload.nbytes == (2 * 5 + 4 * 2) * 4 + 4 * 5 * 4 + 2 * 4 * 4
    back = Payload.from_arrays(payload.arrays(), payload.scalings())
    assert_states_equal(
        ServerState(back.factors, back.residuals, back.extras),
        ServerState(payload.factors, payload.residuals, payload.extras),
    )
    u = updates[0]
    assert s.upload_nbytes(u) == (2 * 5 + 4 * 2) * 4 + 2 * 4 * 4
    got = s.receive(state, "0", s.upload_arrays(u), u.num_examples, {"m": 2.0})
    assert_states_equal(
        ServerState(factors=got.factors, extras=got.extras), ServerState(factors=u.factors, extras=u.extras)
    )
    assert s.trainable("m") == {"A": True, "B": True}


def test_b_only_upload_is_counted_and_refilled_from_payload():
    @dataclass
    class BOnly(FedIT):
        """Sends B only (FFA-LoRA style)."""

        train_parts = ("B",)
        upload_parts = ("B",)
        upload_extras = False

    rng = np.random.default_rng(9)
    state, updates = make_round(rng, 1, 4, 5, 2, dtype=np.float32)
    s = BOnly()
    u = updates[0]
    assert set(s.upload_arrays(u)) == {"lora_B/m"}
    assert s.upload_nbytes(u) == u.factors["m"].B.nbytes
    got = s.receive(state, "0", s.upload_arrays(u), 3)
    np.testing.assert_array_equal(got.factors["m"].A, state.factors["m"].A)
    np.testing.assert_array_equal(got.factors["m"].B, u.factors["m"].B)
    assert got.extras == {} and s.trainable("m") == {"A": False, "B": True}


# --- registry --------------------------------------------------------------------

def test_registry_lists_and_describes():
    assert "fedit" in strategies.available()
    assert strategies.available() == sorted(strategies.available())
    assert strategies.get("fedit") is strategies.fedit.FedIT and FedIT.name == "fedit"
    assert issubclass(FedIT, Strategy)
    lines = dict(strategies.describe())
    assert set(lines) == set(strategies.available())
    assert all(isinstance(v, str) and v and "\n" not in v for v in lines.values())
    assert lines["fedit"].startswith("FedIT")
    assert "\n" not in FedIT(seed=3).describe() and "seed=3" in FedIT(seed=3).describe()


def test_unknown_strategy_names_the_choices():
    with pytest.raises(strategies.UnknownStrategyError) as e:
        strategies.get("fedx")
    assert isinstance(e.value, ValueError) and isinstance(e.value, KeyError)
    assert "strategy.name" in str(e.value) and "'fedx'" in str(e.value) and "fedit" in str(e.value)
    for bad, why in [("nosuchmod_xyz:Cls", "cannot import"), ("strategies.fedit:Nope", "no attribute"),
                     ("numpy:ndarray", "not a strategies.Strategy"), (":X", "expected")]:
        with pytest.raises(strategies.UnknownStrategyError, match=why):
            strategies.get(bad)


def test_register_user_class_and_duplicates(monkeypatch):
    from strategies import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @strategies.register("test-mine")
    @dataclass
    class Mine(FedIT):
        """My rule."""

        lr: float = 1.0

    assert strategies.get("test-mine") is Mine and Mine.name == "test-mine"
    assert ("test-mine", "My rule.") in strategies.describe()
    with pytest.raises(ValueError, match="already registered"):
        strategies.register("fedit")(Mine)
    with pytest.raises(TypeError):
        strategies.register("test-other")(int)
    assert Mine.from_params({"lr": 0.5, "seed": 2}).params() == {"seed": 2, "lr": 0.5}
    with pytest.raises(ValueError, match="strategy.lrr .*valid: seed, lr"):
        Mine.from_params({"lrr": 0.5})


def test_load_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rules_pkg.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import strategies
        from strategies.fedit import FedIT

        @dataclass
        class Halved(FedIT):
            """FedIT, then half the step."""
            factor: float = 0.5
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    S = strategies.get("my_rules_pkg:Halved")
    assert S.__name__ == "Halved" and S(factor=0.25).factor == 0.25


# --- the conformance checker --------------------------------------------------------

def test_check_strategy_passes_for_fedit():
    check_strategy(FedIT)
    check_strategy(FedIT(seed=4), clients=2, rounds=3)


def test_check_strategy_catches_a_false_exact_claim():
    @dataclass
    class Liar(FedIT):
        """FedIT that claims to be exact."""

        exact = True

    with pytest.raises(AssertionError, match=r"\[exact\]"):
        check_strategy(Liar)
    check_strategy(Liar, skip=["exact"])


def test_check_strategy_catches_nondeterminism():
    @dataclass
    class Noisy(FedIT):
        """FedIT plus unseeded noise."""

        def aggregate_factors(self, state, updates, weights):
            new = super().aggregate_factors(state, updates, weights)
            noise = np.random.default_rng()  # not from self.rng(): a bug
            noisy = {
                m: LoRAFactors(f.A + noise.standard_normal(f.A.shape).astype(f.A.dtype), f.B, f.scaling)
                for m, f in new.factors.items()
            }
            return new.replace(factors=noisy)

    with pytest.raises(AssertionError, match=r"\[determinism\]"):
        check_strategy(Noisy)


def test_check_strategy_catches_mutation_and_dishonest_bytes():
    @dataclass
    class Mutator(FedIT):
        """Writes into the client's arrays."""

        def aggregate_factors(self, state, updates, weights):
            updates[0].factors[next(iter(updates[0].factors))].A[0, 0] += 1.0
            return super().aggregate_factors(state, updates, weights)

    with pytest.raises(AssertionError, match=r"\[mutation\]"):
        check_strategy(Mutator)

    @dataclass
    class Understates(FedIT):
        """Claims to upload less than it sends."""

        def upload_nbytes(self, update):
            return 0

    with pytest.raises(AssertionError, match=r"\[bytes\]"):
        check_strategy(Understates)


def test_seeded_rng_is_reproducible():
    a, b = FedIT(seed=1).rng(3, "m").standard_normal(4), FedIT(seed=1).rng(3, "m").standard_normal(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, FedIT(seed=2).rng(3, "m").standard_normal(4))
    assert not np.array_equal(a, FedIT(seed=1).rng(4, "m").standard_normal(4))
