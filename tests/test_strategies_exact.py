"""Exact and personalised rules: ffa-lora, fedsa-lora, fedex-lora, flora, and
the heterogeneous-rank contract (``initialize(client_ranks=)``, ``client_rank``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # plain `pytest` without an installed package
    sys.path.insert(0, str(ROOT))

import strategies  # noqa: E402
from strategies import ClientUpdate, LoRAFactors, ServerState  # noqa: E402
from strategies.testing import assert_states_equal, check_strategy, random_factors  # noqa: E402

MINE = ["ffa-lora", "fedsa-lora", "fedex-lora", "flora"]
EXACT = ["ffa-lora", "fedex-lora", "flora"]
HEAD = "head.weight"


def weights_of(ns):
    n = np.asarray(ns, dtype=np.float64)
    return n / n.sum() if n.sum() > 0 else np.full(len(n), 1 / len(n))


def start(name, rng, d_out, d_in, r0, scaling, dtype, client_ranks=None, residual=False, round=0, **params):
    """A strategy and a state 'from anywhere': initialised, then given a random
    residual and round."""
    s = strategies.get(name)(**params)
    init = {"m": random_factors(rng, d_out, d_in, r0, scaling, dtype)}
    head = {HEAD: rng.standard_normal((2, d_out)).astype(dtype)}
    state = s.initialize(init, extras=head, client_ranks=client_ranks)
    if residual:
        state = state.replace(residuals={"m": rng.standard_normal((d_out, d_in)).astype(dtype)})
    return s, state.replace(round=round)


def client_round(s, state, rng, ids, ns, scalings=None, ranks=None):
    """Each client starts from its payload, trains its trainable parts (random
    values), uploads, and the server rebuilds the update with ``receive``."""
    updates = []
    for k, cid in enumerate(ids):
        payload = s.payload_for(state, cid)
        f = payload.factors["m"]
        rank = f.rank if ranks is None else ranks[k]
        scaling = f.scaling if scalings is None else scalings[k]
        new = random_factors(rng, *f.shape, rank, scaling, f.A.dtype)
        t = s.trainable("m")
        A = new.A if t["A"] or rank != f.rank else f.A
        B = new.B if t["B"] or rank != f.rank else f.B
        head = payload.extras[HEAD] + rng.standard_normal(payload.extras[HEAD].shape).astype(f.A.dtype)
        full = ClientUpdate(cid, {"m": LoRAFactors(A, B, scaling)}, ns[k], {HEAD: head})
        updates.append(s.receive(state, cid, s.upload_arrays(full), ns[k], {"m": scaling}))
    return updates


def exact_mean(updates, module="m"):
    p = weights_of([u.num_examples for u in updates])
    return sum(pi * u.factors[module].delta(np.float64) for pi, u in zip(p, updates))


def assert_close(got, want, dtype):
    tol = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0))))


# --- the exactness property -------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(EXACT),
    k=st.integers(1, 4),
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 5),
    r0=st.integers(1, 3),
    ranks=st.lists(st.integers(1, 4), min_size=4, max_size=4),
    scalings=st.lists(st.sampled_from([0.25, 1.0, 2.0, 8.0]), min_size=4, max_size=4),
    ns=st.lists(st.integers(0, 60), min_size=4, max_size=4),
    residual=st.booleans(),
    round=st.integers(0, 5),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_one_round_is_the_exact_weighted_mean(
    name, k, d_out, d_in, r0, ranks, scalings, ns, residual, round, dtype, seed
):
    rng = np.random.default_rng(seed)
    S = strategies.get(name)
    ids = [str(i) for i in range(k)]
    client_ranks = dict(zip(ids, ranks)) if S.heterogeneous_ranks else None
    s, state = start(name, rng, d_out, d_in, r0, scalings[0], dtype, client_ranks, residual, round)
    before = state.residuals.get("m", np.zeros((d_out, d_in)))
    updates = client_round(s, state, rng, ids, ns[:k], scalings[:k])
    if S.heterogeneous_ranks:
        assert [u.factors["m"].rank for u in updates] == ranks[:k]  # unequal ranks really reach the rule
    new = s.aggregate(state, updates)
    want = before.astype(np.float64) + exact_mean(updates)
    assert_close(new.effective_delta("m", dtype=np.float64), want, dtype)
    assert new.round == round + 1


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 4),
    rounds=st.integers(2, 3),
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 5),
    r=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_fedex_residual_accumulates_over_rounds(k, rounds, d_out, d_in, r, seed):
    rng = np.random.default_rng(seed)
    s, state = start("fedex-lora", rng, d_out, d_in, r, 2.0, np.float64)
    assert state.residuals == {}
    ids = [str(i) for i in range(k)]
    total = np.zeros((d_out, d_in))
    for _ in range(rounds):
        ns = [int(n) for n in rng.integers(0, 40, size=k)]
        before = state.residuals.get("m", np.zeros((d_out, d_in)))
        updates = client_round(s, state, rng, ids, ns)
        state = s.aggregate(state, updates)
        mean = exact_mean(updates)
        f = state.factors["m"]
        total += mean - f.scaling * f.B @ f.A  # this round's averaging error
        np.testing.assert_allclose(state.effective_delta("m"), before + mean, atol=1e-10)
        np.testing.assert_allclose(state.residuals["m"], total, atol=1e-10)  # absolute, not an increment
        # the averaged factors are FedIT's
        p = weights_of(ns)
        np.testing.assert_allclose(f.A, sum(pi * u.factors["m"].A for pi, u in zip(p, updates)), atol=1e-12)
        # the residual is part of the payload, and counted
        payload = s.payload_for(state, "0")
        np.testing.assert_array_equal(payload.residuals["m"], state.residuals["m"])
        assert payload.nbytes == f.A.nbytes + f.B.nbytes + state.residuals["m"].nbytes + state.extras[HEAD].nbytes


def test_fedex_residual_is_zero_when_clients_agree():
    rng = np.random.default_rng(0)
    s, state = start("fedex-lora", rng, 4, 3, 2, 1.0, np.float64)
    same = random_factors(rng, 4, 3, 2, 1.0, np.float64)
    new = s.aggregate(state, [ClientUpdate(c, {"m": same.copy()}, 5) for c in "ab"])
    np.testing.assert_allclose(new.residuals["m"], 0.0, atol=1e-14)


# --- ffa-lora -------------------------------------------------------------------------

def test_ffa_keeps_A_and_uploads_only_B_and_extras():
    rng = np.random.default_rng(1)
    s, state = start("ffa-lora", rng, 6, 5, 3, 2.0, np.float32)
    A0 = state.factors["m"].A.copy()
    assert s.trainable("m") == {"A": False, "B": True}
    for _ in range(3):
        payload = s.payload_for(state, "0")
        assert set(payload.arrays()) == {"lora_A/m", "lora_B/m", f"extra/{HEAD}"}
        assert payload.nbytes == (3 * 5 + 6 * 3 + 2 * 6) * 4
        updates = client_round(s, state, rng, ["0", "1", "2"], [3, 0, 9])
        u = ClientUpdate("0", updates[0].factors, 3, updates[0].extras)
        sent = s.upload_arrays(u)
        assert set(sent) == {"lora_B/m", f"extra/{HEAD}"}
        assert s.upload_nbytes(u) == (6 * 3 + 2 * 6) * 4 == u.factors["m"].B.nbytes + u.extras[HEAD].nbytes
        state = s.aggregate(state, updates)
        np.testing.assert_array_equal(state.factors["m"].A, A0)
        p = weights_of([3, 0, 9])
        np.testing.assert_allclose(state.factors["m"].B, sum(pi * u.factors["m"].B for pi, u in zip(p, updates)),
                                   rtol=1e-6)


def test_ffa_rejects_a_client_that_trained_A():
    rng = np.random.default_rng(2)
    s, state = start("ffa-lora", rng, 4, 3, 2, 1.0, np.float32)
    bad = random_factors(rng, 4, 3, 2, 1.0)
    with pytest.raises(ValueError, match="changed the frozen A"):
        s.aggregate(state, [ClientUpdate("7", {"m": bad}, 3)])


# --- fedsa-lora ------------------------------------------------------------------------

def test_fedsa_keeps_each_clients_B_and_averages_A():
    rng = np.random.default_rng(3)
    s, state = start("fedsa-lora", rng, 5, 4, 2, 2.0, np.float64)
    B0 = state.factors["m"].B.copy()
    assert not strategies.get("fedsa-lora").exact

    # round 1: clients 0, 1, 2
    ns1 = [10, 30, 0]
    up1 = client_round(s, state, rng, ["0", "1", "2"], ns1)
    s1 = s.aggregate(state, up1)
    p = weights_of(ns1)
    A1 = sum(pi * u.factors["m"].A for pi, u in zip(p, up1))
    np.testing.assert_allclose(s1.factors["m"].A, A1, atol=1e-12)
    for u in up1:  # each gets its own B back, with the new global A
        f = s.payload_for(s1, u.client_id).factors["m"]
        np.testing.assert_array_equal(f.B, u.factors["m"].B)
        np.testing.assert_array_equal(f.A, s1.factors["m"].A)
        np.testing.assert_allclose(s1.effective_delta("m", client_id=u.client_id), 2.0 * u.factors["m"].B @ A1)
    # a client never seen gets the initial B (and the current A)
    new = s.payload_for(s1, "99").factors["m"]
    np.testing.assert_array_equal(new.B, B0)
    np.testing.assert_allclose(s1.effective_delta("m", client_id="99"), 2.0 * B0 @ A1)
    # global B (centralised evaluation): example-weighted mean of the kept B's
    np.testing.assert_allclose(s1.factors["m"].B, sum(pi * u.factors["m"].B for pi, u in zip(p, up1)), atol=1e-12)

    # round 2: only clients 1 and 3 (new); client 0 and 2 keep B, move to the new A
    up2 = client_round(s, s1, rng, ["1", "3"], [5, 15])
    s2 = s.aggregate(s1, up2)
    A2 = 0.25 * up2[0].factors["m"].A + 0.75 * up2[1].factors["m"].A
    np.testing.assert_allclose(s2.factors["m"].A, A2, atol=1e-12)
    np.testing.assert_array_equal(s.payload_for(s2, "0").factors["m"].B, up1[0].factors["m"].B)
    np.testing.assert_array_equal(s.payload_for(s2, "1").factors["m"].B, up2[0].factors["m"].B)
    np.testing.assert_allclose(s2.effective_delta("m", client_id="0"), 2.0 * up1[0].factors["m"].B @ A2)
    counts = {"0": 10, "1": 5, "2": 0, "3": 15}
    assert s2.meta["num_examples"] == counts
    latest = {"0": up1[0], "1": up2[0], "2": up1[2], "3": up2[1]}
    q = weights_of(list(counts.values()))
    np.testing.assert_allclose(
        s2.factors["m"].B, sum(qi * latest[c].factors["m"].B for qi, c in zip(q, counts)), atol=1e-12
    )


def test_fedsa_bytes_are_global_A_plus_own_B_down_and_A_B_up():
    rng = np.random.default_rng(4)
    s, state = start("fedsa-lora", rng, 6, 5, 3, 1.0, np.float32)
    state = s.aggregate(state, client_round(s, state, rng, ["0", "1"], [1, 2]))
    payload = s.payload_for(state, "1")
    assert payload.nbytes == (3 * 5 + 6 * 3 + 2 * 6) * 4
    u = client_round(s, state, rng, ["1"], [2])[0]
    assert s.upload_nbytes(u) == (3 * 5 + 6 * 3 + 2 * 6) * 4


def test_fedsa_checkpoint_round_trip_writes_shared_A_once(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(5)
    s, state = start("fedsa-lora", rng, 6, 5, 3, 1.0, np.float32)
    for _ in range(2):
        state = s.aggregate(state, client_round(s, state, rng, ["0", "1", "2"], [1, 2, 3]))
    state.save(tmp_path)
    assert_states_equal(state, ServerState.load(tmp_path))
    stored = load_file(str(tmp_path / "state.safetensors"))
    assert sum(a.shape == (3, 5) for a in stored.values()) == 1  # one global A, not one per client
    again = ServerState.load(tmp_path)
    more = client_round(s, again, np.random.default_rng(6), ["0", "1"], [1, 1])
    assert_states_equal(s.aggregate(again, more), s.aggregate(state, more))  # resuming equals never stopping


# --- flora ------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_flora_stacking_identity_for_any_ranks(ranks, d_out, d_in, seed):
    rng = np.random.default_rng(seed)
    fs = [random_factors(rng, d_out, d_in, r, float(rng.uniform(0.1, 3)), np.float64) for r in ranks]
    p = rng.dirichlet(np.ones(len(ranks)))
    stacked = strategies.get("flora").stack(fs, p)
    assert stacked.rank == sum(ranks) and stacked.scaling == 1.0
    np.testing.assert_allclose(stacked.delta(), sum(pi * f.delta() for pi, f in zip(p, fs)), atol=1e-10)


def test_flora_restarts_fresh_adapters_at_each_clients_rank_and_counts_the_residual():
    rng = np.random.default_rng(7)
    ranks = {"0": 1, "1": 4, "2": 2}
    s, state = start("flora", rng, 6, 5, 2, 2.0, np.float32, client_ranks=ranks)
    # the nonzero initial adapter went into the residual; global factors are at the max rank, B = 0
    assert state.factors["m"].rank == 4 and not np.any(state.factors["m"].B)
    assert state.meta["client_ranks"] == ranks
    for rnd in range(2):
        for cid, r in ranks.items():
            p = s.payload_for(state, cid)
            f = p.factors["m"]
            assert f.rank == r == s.client_rank(state, cid, "m") and not np.any(f.B) and f.scaling == 2.0
            assert np.all(np.abs(f.A) <= 1 / np.sqrt(5)) and np.any(f.A)
            assert p.nbytes == (r * 5 + 6 * r + 6 * 5 + 2 * 6) * 4  # dense residual included
            np.testing.assert_array_equal(p.residuals["m"], state.residuals["m"])
        old_A = state.factors["m"].A
        state = s.aggregate(state, client_round(s, state, rng, list(ranks), [3, 5, 7]))
        assert not np.array_equal(state.factors["m"].A, old_A)  # fresh A each round
    assert s.payload_for(state, "unlisted").factors["m"].rank == 4  # falls back to the global rank
    # a client may even return a rank other than the one it was sent
    before = state.residuals["m"].astype(np.float64)
    odd = client_round(s, state, rng, ["0", "1"], [1, 1], ranks=[3, 1])
    new = s.aggregate(state, odd)
    assert_close(new.effective_delta("m", dtype=np.float64), before + exact_mean(odd), np.float32)


def test_flora_fresh_adapters_are_seeded():
    rng = np.random.default_rng(8)
    init = {"m": random_factors(rng, 4, 3, 2, 1.0)}
    F = strategies.get("flora")
    a = F(seed=1).initialize(init).factors["m"].A
    np.testing.assert_array_equal(a, F(seed=1).initialize(init).factors["m"].A)
    assert not np.array_equal(a, F(seed=2).initialize(init).factors["m"].A)
    zero_b = {"m": LoRAFactors(init["m"].A, np.zeros((4, 2), np.float32), 1.0)}
    assert F().initialize(zero_b).residuals == {}  # nothing to merge, nothing to send


# --- the heterogeneous-rank contract ----------------------------------------------------

def test_client_ranks_contract(tmp_path):
    FedIT = strategies.get("fedit")
    init = {"m": random_factors(np.random.default_rng(9), 4, 3, 2, 1.0)}
    plain = FedIT().initialize(init)
    assert "client_ranks" not in plain.meta and FedIT().client_rank(plain, "0", "m") == 2
    state = FedIT().initialize(init, client_ranks={0: 1, "b": np.int64(8)})
    assert state.meta["client_ranks"] == {"0": 1, "b": 8}
    assert type(state.meta["client_ranks"]["b"]) is int
    assert FedIT().client_rank(state, 0, "m") == 1 and FedIT().client_rank(state, "zz", "m") == 2
    state.save(tmp_path)
    assert ServerState.load(tmp_path).meta == state.meta
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="client_ranks"):
            FedIT().initialize(init, client_ranks={"a": bad})
    with pytest.raises(KeyError, match="unknown module"):
        FedIT().client_rank(plain, "0", "nope")


# --- every rule --------------------------------------------------------------------------

@pytest.mark.parametrize("name", MINE)
def test_conformance(name):
    S = strategies.get(name)
    check_strategy(S)
    check_strategy(S(seed=3), clients=2, rounds=3, seed=1)
    assert S.summary() and "\n" not in S.summary() and S.__doc__.count("\n") > 5


@pytest.mark.parametrize("name", MINE)
def test_no_nan_on_zero_updates_and_zero_examples(name):
    rng = np.random.default_rng(10)
    S = strategies.get(name)
    ids = ["0", "1", "2"]
    ranks = {c: 2 for c in ids} if S.heterogeneous_ranks else None
    s, state = start(name, rng, 4, 3, 2, 1.0, np.float32, client_ranks=ranks)
    for _ in range(2):
        updates = []
        for cid in ids:
            f = s.payload_for(state, cid).factors["m"]
            zero = LoRAFactors(np.zeros_like(f.A) if s.trainable("m")["A"] else f.A, np.zeros_like(f.B), f.scaling)
            updates.append(ClientUpdate(cid, {"m": zero}, 0, {HEAD: np.zeros((2, 4), np.float32)}))
        state = s.aggregate(state, updates)
        for cid in [None, *ids]:
            assert np.all(np.isfinite(state.effective_delta("m", cid)))
        assert all(np.all(np.isfinite(x)) for x in state.extras.values())


@pytest.mark.parametrize("name", MINE)
def test_deterministic_and_checkpoint_exact(name, tmp_path):
    def run(seed_data):
        rng = np.random.default_rng(seed_data)
        S = strategies.get(name)
        ids = ["0", "1", "2"]
        s, state = start(name, rng, 4, 3, 2, 1.0, np.float32,
                         client_ranks=dict(zip(ids, [1, 2, 3])) if S.heterogeneous_ranks else None, seed=5)
        for _ in range(2):
            state = s.aggregate(state, client_round(s, state, rng, ids, [2, 4, 6]))
        return state

    a, b = run(11), run(11)
    assert_states_equal(a, b)
    a.save(tmp_path)
    assert_states_equal(a, ServerState.load(tmp_path))
