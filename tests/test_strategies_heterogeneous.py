"""Tests of hetlora, flexlora (heterogeneous ranks), fedsvd and ties."""

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
from strategies.fedsvd import orthonormalise, refactorise  # noqa: E402
from strategies.testing import assert_states_equal, check_strategy, random_factors  # noqa: E402
from strategies.ties import disjoint_mean, elect_sign, ties_merge, trim  # noqa: E402
from strategies.utils import complete_rows, lowrank_svd, pad_rank, tail_norms, truncate_rank  # noqa: E402

HetLoRA = strategies.get("hetlora")
FlexLoRA = strategies.get("flexlora")
FedSVD = strategies.get("fedsvd")
TIES = strategies.get("ties")
FedIT = strategies.get("fedit")

HETEROGENEOUS = [HetLoRA, FlexLoRA]
RANKS = {"a": 2, "b": 4, "c": 8}
D_OUT, D_IN = 10, 12


def weights_of(ns):
    n = np.asarray(ns, dtype=np.float64)
    return n / n.sum() if n.sum() > 0 else np.full(len(n), 1 / len(n))


def exact_mean(updates, m="m"):
    p = weights_of([u.num_examples for u in updates])
    return sum(pi * u.factors[m].delta(np.float64) for pi, u in zip(p, updates))


def het_state(S, rng, scaling=2.0, dtype=np.float32, **params):
    s = S(**params)
    init = LoRAFactors(
        rng.standard_normal((max(RANKS.values()), D_IN)).astype(dtype),
        np.zeros((D_OUT, max(RANKS.values())), dtype),
        scaling,
    )
    head = {"head.weight": rng.standard_normal((2, D_OUT)).astype(dtype)}
    return s, s.initialize({"m": init}, extras=head, client_ranks=RANKS)


def train(s, state, rng, zero=False, ns=None):
    """Each client of RANKS starts from its payload and returns new factors
    at its own rank (random, or all zeros)."""
    updates = []
    for k, cid in enumerate(sorted(RANKS)):
        payload = s.payload_for(state, cid)
        f = payload.factors["m"]
        new = random_factors(rng, D_OUT, D_IN, f.rank, f.scaling, f.A.dtype)
        if zero:
            new = LoRAFactors(np.zeros_like(new.A), np.zeros_like(new.B), f.scaling)
        extras = {n: x + 1.0 for n, x in payload.extras.items()}
        n = ns[k] if ns is not None else 10 * (k + 1)
        full = ClientUpdate(cid, {"m": new}, n, extras)
        updates.append(s.receive(state, cid, s.upload_arrays(full), n, {"m": f.scaling}))
    return updates


# --- heterogeneous ranks: hetlora and flexlora -----------------------------------

@pytest.mark.parametrize("S", HETEROGENEOUS)
def test_payload_has_each_clients_rank_and_bytes_are_the_arrays_sent(S):
    rng = np.random.default_rng(0)
    s, state = het_state(S, rng)
    assert S.heterogeneous_ranks and state.meta["client_ranks"] == RANKS
    for rnd in range(2):
        for cid, r in RANKS.items():
            p = s.payload_for(state, cid)
            f = p.factors["m"]
            assert f.rank == r == s.client_rank(state, cid, "m")
            assert f.A.shape == (r, D_IN) and f.B.shape == (D_OUT, r)
            assert p.nbytes == (r * D_IN + D_OUT * r + 2 * D_OUT) * 4
            np.testing.assert_allclose(
                f.delta(np.float64), state.effective_delta("m", cid, np.float64), rtol=1e-6, atol=1e-6
            )
            # the truncation of the global factors
            g = state.factors["m"]
            np.testing.assert_array_equal(f.A, g.A[:r])
            np.testing.assert_array_equal(f.B, g.B[:, :r])
        updates = train(s, state, rng)
        for u in updates:
            r = RANKS[u.client_id]
            assert s.upload_nbytes(u) == (r * D_IN + D_OUT * r + 2 * D_OUT) * 4
        state = s.aggregate(state, updates)
        assert state.factors["m"].rank == 8 and state.round == rnd + 1
        assert state.meta["client_ranks"] == RANKS
    assert s.payload_for(state, "unknown").factors["m"].rank == 8  # unknown clients: global rank


@pytest.mark.parametrize("S", HETEROGENEOUS)
def test_zero_updates_give_no_nan(S):
    rng = np.random.default_rng(1)
    s, state = het_state(S, rng)
    for ns in ([10, 20, 30], [0, 0, 0]):
        new = s.aggregate(state, train(s, state, rng, zero=True, ns=ns))
        for cid in [None, *RANKS]:
            d = new.effective_delta("m", cid)
            assert np.all(np.isfinite(d)) and np.all(d == 0)
        assert all(np.all(np.isfinite(a)) for a in (new.factors["m"].A, new.factors["m"].B))


@pytest.mark.parametrize("S", HETEROGENEOUS)
def test_deterministic_and_checkpoint_round_trip(S, tmp_path):
    rng = np.random.default_rng(2)
    s, state = het_state(S, rng)
    updates = train(s, state, rng)
    new = s.aggregate(state, updates)
    assert_states_equal(new, S().aggregate(state.copy(), updates[::-1]))
    new.save(tmp_path / "ckpt")
    loaded = ServerState.load(tmp_path / "ckpt")
    assert_states_equal(new, loaded)
    for cid in RANKS:
        p, q = s.payload_for(new, cid), s.payload_for(loaded, cid)
        assert_states_equal(ServerState(factors=p.factors, extras=p.extras),
                            ServerState(factors=q.factors, extras=q.extras))


@pytest.mark.parametrize("S", HETEROGENEOUS)
def test_client_rank_above_the_initial_adapter_is_refused(S):
    init = LoRAFactors(np.ones((2, 3), np.float32), np.zeros((4, 2), np.float32), 1.0)
    with pytest.raises(ValueError, match="largest client rank"):
        S().initialize({"m": init}, client_ranks={"a": 4})
    with pytest.raises(ValueError, match="positive integer"):
        S().initialize({"m": init}, client_ranks={"a": 0})


@pytest.mark.parametrize("S", HETEROGENEOUS)
def test_check_strategy_heterogeneous(S):
    check_strategy(S)
    check_strategy(S, clients=2, rounds=3, seed=5)


# --- hetlora ---------------------------------------------------------------------

@pytest.mark.parametrize("weighting", ["norm_examples", "norm", "examples"])
def test_hetlora_pads_weights_by_norm_and_truncates(weighting):
    # client x: rank 1, update norm 2; client y: rank 2, update norm sqrt(2)
    x = LoRAFactors(np.array([[1.0, 0.0]]), np.array([[2.0], [0.0]]), 1.0)
    y = LoRAFactors(np.eye(2), np.eye(2), 1.0)
    state = HetLoRA().initialize({"m": LoRAFactors(np.ones((2, 2)), np.zeros((2, 2)), 1.0)},
                                 client_ranks={"x": 1, "y": 2})
    ns = np.array([1.0, 3.0])
    new = HetLoRA(weighting=weighting).aggregate(
        state, [ClientUpdate("x", {"m": x}, 1), ClientUpdate("y", {"m": y}, 3)])
    norms = np.array([2.0, np.sqrt(2.0)])
    w = {"norm_examples": norms * ns, "norm": norms, "examples": ns}[weighting]
    w = w / w.sum()
    np.testing.assert_allclose(new.factors["m"].A, w[0] * np.array([[1.0, 0], [0, 0]]) + w[1] * np.eye(2))
    np.testing.assert_allclose(new.factors["m"].B, w[0] * np.array([[2.0, 0], [0, 0]]) + w[1] * np.eye(2))
    f = HetLoRA().payload_for(new, "x").factors["m"]
    np.testing.assert_array_equal(f.A, new.factors["m"].A[:1])
    assert new.client_factors["x"]["m"].rank == 1 and "y" not in new.client_factors


def test_hetlora_folds_scalings_into_B():
    rng = np.random.default_rng(3)
    s, state = het_state(HetLoRA, rng, weighting="examples", dtype=np.float64)
    updates = train(s, state, rng)
    for u, sc in zip(updates, [0.5, 1.0, 4.0]):
        u.factors["m"].scaling = sc
    new = s.aggregate(state, updates)
    p = weights_of([u.num_examples for u in updates])
    want = sum(pi * u.factors["m"].scaling * pad_rank(u.factors["m"], 8).B for pi, u in zip(p, updates))
    np.testing.assert_allclose(new.factors["m"].scaling * new.factors["m"].B, want, atol=1e-12)


def test_hetlora_prunes_small_tail_ranks():
    # orthogonal rank-1 components of norms 10, 5, 0.01, 0.01
    A, B = np.eye(4, 6), np.diag([10.0, 5.0, 0.01, 0.01])[:, :4]
    B = np.vstack([B, np.zeros((1, 4))])
    f = LoRAFactors(A, B, 1.0)
    init = LoRAFactors(np.ones((4, 6)), np.zeros((5, 4)), 1.0)
    s = HetLoRA(prune_threshold=0.01)
    state = s.initialize({"m": init}, client_ranks={"p": 4, "q": 4})
    assert s.pruned_rank(ClientUpdate("p", {"m": f}, 1)) == 2
    assert HetLoRA(prune_threshold=0.01, min_rank=3).pruned_rank(ClientUpdate("p", {"m": f}, 1)) == 3
    assert HetLoRA().pruned_rank(ClientUpdate("p", {"m": f}, 1)) == 4  # off by default
    zero = LoRAFactors(np.zeros((4, 6)), np.zeros((5, 4)), 1.0)
    assert s.pruned_rank(ClientUpdate("p", {"m": zero}, 1)) == 4  # nothing to judge by
    q = LoRAFactors(np.eye(4, 6), np.eye(5, 4), 1.0)  # equal components: kept
    new = s.aggregate(state, [ClientUpdate("p", {"m": f}, 1), ClientUpdate("q", {"m": q}, 1)])
    assert new.meta["client_ranks"] == {"p": 2, "q": 4}
    assert new.factors["m"].rank == 4
    assert s.payload_for(new, "p").factors["m"].rank == 2
    # the pruned tail did not enter the average: component 3 only has q's part
    w = np.array([np.sqrt(125.0), 2.0])  # norms of p's pruned update and of q's
    w = w / w.sum()
    np.testing.assert_allclose(new.factors["m"].B[3, 3], w[1] * 1.0)
    check_strategy(HetLoRA, prune_threshold=0.3)


def test_hetlora_rejects_bad_parameters():
    with pytest.raises(ValueError, match="weighting"):
        HetLoRA(weighting="size")
    with pytest.raises(ValueError, match="prune_threshold"):
        HetLoRA(prune_threshold=1.5)
    with pytest.raises(ValueError, match="min_rank"):
        HetLoRA(min_rank=0)


# --- flexlora --------------------------------------------------------------------

def flex_round(rng, ranks, d_out, d_in, R, ns, scaling=2.0):
    s = FlexLoRA()
    init = random_factors(rng, d_out, d_in, R, scaling, np.float64)
    state = s.initialize({"m": init}, client_ranks={str(i): r for i, r in enumerate(ranks)})
    state.residuals["m"] = rng.standard_normal((d_out, d_in))
    updates = [
        ClientUpdate(str(i), {"m": random_factors(rng, d_out, d_in, r, scaling, np.float64)}, n)
        for i, (r, n) in enumerate(zip(ranks, ns))
    ]
    return s, state, updates


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    d_out=st.integers(1, 7),
    d_in=st.integers(1, 7),
    ns=st.lists(st.integers(0, 50), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_flexlora_is_exact_when_max_rank_covers_the_update(ranks, d_out, d_in, ns, seed):
    rng = np.random.default_rng(seed)
    R = sum(ranks)  # >= rank(dW)
    s, state, updates = flex_round(rng, ranks, d_out, d_in, R, ns[: len(ranks)])
    new = s.aggregate(state, updates)
    want = state.residuals["m"] + exact_mean(updates)
    np.testing.assert_allclose(new.effective_delta("m"), want, atol=1e-9 * max(1, np.abs(want).max()))
    f = new.factors["m"]
    assert f.rank == R and f.scaling == 2.0
    # sqrt(S) split over both factors: s B^T B = diag(S) = s A A^T on the live part
    S = np.linalg.svd(exact_mean(updates), compute_uv=False)
    live = int(np.count_nonzero(S > 1e-9 * max(1.0, S.max())))
    G = f.scaling * f.B.T @ f.B
    np.testing.assert_allclose(np.diag(G)[:live], S[:live], rtol=1e-8)
    np.testing.assert_allclose(np.diag(f.scaling * f.A @ f.A.T)[:live], S[:live], rtol=1e-8)


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(2, 4), min_size=2, max_size=3),
    small=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_flexlora_truncation_error_is_the_dropped_singular_values(ranks, small, seed):
    rng = np.random.default_rng(seed)
    d_out, d_in, R = 9, 8, max(ranks)
    ns = [int(n) for n in rng.integers(1, 20, size=len(ranks))]
    s, state, updates = flex_round(rng, ranks, d_out, d_in, R, ns)
    state.residuals.clear()
    new = s.aggregate(state, updates)
    dW = exact_mean(updates)
    S = np.linalg.svd(dW, compute_uv=False)
    err = np.linalg.norm(dW - new.effective_delta("m")) ** 2
    np.testing.assert_allclose(err, np.sum(S[R:] ** 2), rtol=1e-6, atol=1e-9)
    # a client of a smaller rank gets the best approximation at its rank
    new.meta["client_ranks"]["0"] = small
    new = s._with_truncations(new)
    f = s.payload_for(new, "0").factors["m"]
    assert f.rank == small
    err = np.linalg.norm(dW - f.delta()) ** 2
    np.testing.assert_allclose(err, np.sum(S[small:] ** 2), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(f.delta(), new.effective_delta("m", "0"), atol=1e-12)


def test_flexlora_unused_components_stay_trainable():
    # one rank-1 client, global rank 3: two components have S = 0
    rng = np.random.default_rng(4)
    s, state, updates = flex_round(rng, [1], 5, 6, 3, [1])
    f = s.aggregate(state, updates).factors["m"]
    np.testing.assert_allclose(f.A[1:] @ f.A[1:].T, np.eye(2), atol=1e-12)  # unit, orthogonal rows
    np.testing.assert_array_equal(f.B[:, 1:], 0.0)  # zero columns: like a fresh LoRA component
    np.testing.assert_allclose(f.A[1:] @ f.A[:1].T, 0.0, atol=1e-12)


# --- fedsvd ----------------------------------------------------------------------

def fedsvd_round(rng, k, d_out, d_in, r, ns, scaling=2.0, dtype=np.float64):
    s = FedSVD()
    init = random_factors(rng, d_out, d_in, r, scaling, dtype)
    head = {"head.bias": rng.standard_normal(2).astype(dtype)}
    state = s.initialize({"m": init}, extras=head)
    state.residuals["m"] = rng.standard_normal((d_out, d_in)).astype(dtype)
    g = state.factors["m"]
    updates = []
    for i in range(k):
        full = ClientUpdate(
            str(i), {"m": LoRAFactors(g.A, rng.standard_normal((d_out, r)).astype(dtype), scaling)},
            ns[i], {"head.bias": rng.standard_normal(2).astype(dtype)},
        )
        updates.append(s.receive(state, str(i), s.upload_arrays(full), ns[i]))
    return s, state, updates


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 4),
    d_out=st.integers(1, 7),
    d_in=st.integers(1, 7),
    r=st.integers(1, 4),
    ns=st.lists(st.integers(0, 50), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fedsvd_is_exact_and_A_orthonormal(k, d_out, d_in, r, ns, seed):
    rng = np.random.default_rng(seed)
    s, state, updates = fedsvd_round(rng, k, d_out, d_in, r, ns[:k])
    new = s.aggregate(state, updates)
    want = state.residuals["m"] + exact_mean(updates)
    np.testing.assert_allclose(new.effective_delta("m"), want, atol=1e-9 * max(1, np.abs(want).max()))
    A = new.factors["m"].A
    q = min(r, d_in)
    np.testing.assert_allclose(A[:q] @ A[:q].T, np.eye(q), atol=1e-10)
    assert new.factors["m"].rank == r


@settings(max_examples=30, deadline=None)
@given(
    d_out=st.integers(1, 7),
    d_in=st.integers(1, 7),
    r=st.integers(0, 4),
    zero_cols=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_refactorisation_keeps_the_delta(d_out, d_in, r, zero_cols, seed):
    rng = np.random.default_rng(seed)
    f = random_factors(rng, d_out, d_in, r, 0.7, np.float64)
    f.B[:, :zero_cols] = 0.0  # rank-deficient products too
    for g in (refactorise(f), orthonormalise(f)):
        np.testing.assert_allclose(g.delta(), f.delta(), atol=1e-10 * max(1, np.abs(f.delta()).max()))
        q = min(r, d_in)
        np.testing.assert_allclose(g.A[:q] @ g.A[:q].T, np.eye(q), atol=1e-10)
        assert g.A.shape == f.A.shape and g.B.shape == f.B.shape and g.scaling == f.scaling
    # on a fresh LoRA init (B = 0) the QR keeps A's row space
    f.B[:] = 0.0
    g = orthonormalise(f)
    if 0 < r <= d_in:
        P = g.A.T @ g.A  # projector onto the new row space
        np.testing.assert_allclose(f.A @ P, f.A, atol=1e-10 * max(1, np.abs(f.A).max()))


def test_fedsvd_uploads_only_B_and_sends_A():
    rng = np.random.default_rng(5)
    s, state, updates = fedsvd_round(rng, 2, 5, 6, 3, [3, 4], dtype=np.float32)
    assert s.trainable("m") == {"A": False, "B": True}
    u = updates[0]
    assert set(s.upload_arrays(u)) == {"lora_B/m", "extra/head.bias"}
    assert s.upload_nbytes(u) == (5 * 3 + 2) * 4
    new = s.aggregate(state, updates)
    p = s.payload_for(new, "0")
    assert set(p.arrays()) == {"lora_A/m", "lora_B/m", "residual/m", "extra/head.bias"}
    assert p.nbytes == (3 * 6 + 5 * 3 + 5 * 6 + 2) * 4
    assert not np.array_equal(new.factors["m"].A, state.factors["m"].A)  # a new A each round
    assert new.factors["m"].A.dtype == np.float32


def test_fedsvd_refuses_a_changed_A_and_can_refactor_less_often():
    rng = np.random.default_rng(6)
    s, state, updates = fedsvd_round(rng, 2, 5, 6, 3, [3, 4])
    bad = ClientUpdate("9", {"m": random_factors(rng, 5, 6, 3, 2.0, np.float64)}, 1)
    with pytest.raises(ValueError, match="keep A frozen"):
        s.aggregate(state, [bad])
    lazy = FedSVD(refactor_every=2)
    one = lazy.aggregate(state, updates)
    np.testing.assert_array_equal(one.factors["m"].A, state.factors["m"].A)  # round 1: A kept
    assert one.round == 1
    with pytest.raises(ValueError, match="refactor_every"):
        FedSVD(refactor_every=0)


def test_fedsvd_initialize_orthonormalises_and_keeps_delta():
    rng = np.random.default_rng(7)
    f = random_factors(rng, 5, 6, 3, 2.0, np.float32)
    state = FedSVD().initialize({"m": f})
    g = state.factors["m"]
    np.testing.assert_allclose(g.A @ g.A.T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(g.delta(np.float64), f.delta(np.float64), atol=1e-4)


def test_check_strategy_fedsvd():
    assert FedSVD.exact
    check_strategy(FedSVD)
    check_strategy(FedSVD, refactor_every=2, rounds=3)


# --- ties ------------------------------------------------------------------------

D1 = np.array([1.0, -2.5, 0.5, 3.0, 0.0])
D2 = np.array([-3.0, 1.0, 0.4, 1.0, -0.1])
D3 = np.array([1.5, 1.0, -0.2, -3.5, 0.0])


def test_ties_steps_on_a_hand_made_example():
    # density 0.6 keeps 3 of 5 entries; the tie between 1.0s in D2 goes to the first
    t = [trim(d, 0.6) for d in (D1, D2, D3)]
    np.testing.assert_array_equal(t[0], [1.0, -2.5, 0, 3.0, 0])
    np.testing.assert_array_equal(t[1], [-3.0, 1.0, 0, 1.0, 0])
    np.testing.assert_array_equal(t[2], [1.5, 1.0, 0, -3.5, 0])
    equal = [1 / 3] * 3
    sign = elect_sign(t, equal)  # sums: -0.5, -0.5, 0, 0.5, 0
    np.testing.assert_array_equal(sign, [-1, -1, 0, 1, 0])
    np.testing.assert_allclose(disjoint_mean(t, equal, sign), [-3.0, -2.5, 0, 2.0, 0])
    # example weights change the election and the means: p = (1/2, 1/4, 1/4)
    p = [0.5, 0.25, 0.25]
    np.testing.assert_allclose(ties_merge([D1, D2, D3], p, 0.6), [7 / 6, -2.5, 0, 7 / 3, 0])


def test_ties_rule_applies_the_merge_to_the_factors():
    A0 = np.arange(5.0).reshape(1, 5)
    B0 = np.ones((2, 1))
    state = TIES(density=0.6).initialize({"m": LoRAFactors(A0, B0, 1.0)})
    updates = [ClientUpdate(str(i), {"m": LoRAFactors(A0 + d, B0, 1.0)}, n)
               for i, (d, n) in enumerate(zip((D1, D2, D3), (2, 1, 1)))]
    for scale in (1.0, 0.5):
        new = TIES(density=0.6, scale=scale).aggregate(state, updates)
        np.testing.assert_allclose(new.factors["m"].A, A0 + scale * np.array([[7 / 6, -2.5, 0, 7 / 3, 0]]))
        np.testing.assert_array_equal(new.factors["m"].B, B0)  # no B update: nothing to merge


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 4),
    d_out=st.integers(1, 5),
    d_in=st.integers(1, 5),
    r=st.integers(1, 3),
    ns=st.lists(st.integers(1, 50), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_ties_with_full_density_and_agreeing_signs_is_the_weighted_average(k, d_out, d_in, r, ns, seed):
    rng = np.random.default_rng(seed)
    old = random_factors(rng, d_out, d_in, r, 2.0, np.float64)
    sign_A, sign_B = rng.choice([-1.0, 1.0], old.A.shape), rng.choice([-1.0, 1.0], old.B.shape)
    updates = [  # every client moves each entry the same way, by a nonzero amount
        ClientUpdate(str(i), {"m": LoRAFactors(old.A + sign_A * rng.uniform(0.1, 1, old.A.shape),
                                               old.B + sign_B * rng.uniform(0.1, 1, old.B.shape), 2.0)}, n)
        for i, n in enumerate(ns[:k])
    ]
    state = TIES().initialize({"m": old})
    new = TIES(density=1.0).aggregate(state, updates)
    avg = FedIT().aggregate(FedIT().initialize({"m": old}), updates)
    np.testing.assert_allclose(new.factors["m"].A, avg.factors["m"].A, atol=1e-12)
    np.testing.assert_allclose(new.factors["m"].B, avg.factors["m"].B, atol=1e-12)


def test_ties_trim_density_and_parameters():
    d = np.array([[0.1, -5.0], [2.0, 0.0]])
    np.testing.assert_array_equal(trim(d, 0.2), [[0, -5.0], [0, 0]])  # ceil(0.8) = 1 entry
    np.testing.assert_array_equal(trim(d, 0.5), [[0, -5.0], [2.0, 0]])
    np.testing.assert_array_equal(trim(d, 1.0), d)
    np.testing.assert_array_equal(trim(np.arange(10.0), 0.2), [0] * 8 + [8.0, 9.0])  # 0.2 * 10 is 2
    with pytest.raises(ValueError, match="density"):
        TIES(density=0.0)
    with pytest.raises(ValueError, match="scale"):
        TIES(scale=float("nan"))


def test_check_strategy_ties():
    check_strategy(TIES)
    check_strategy(TIES, density=1.0, scale=0.5, clients=2, rounds=3)


# --- low-rank helpers ------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 6), n=st.integers(1, 6), k=st.integers(0, 8), seed=st.integers(0, 2**16)
)
def test_lowrank_helpers_match_dense_math(m, n, k, seed):
    rng = np.random.default_rng(seed)
    f = random_factors(rng, m, n, k, 1.5, np.float64)
    t = tail_norms(f)
    want = [np.linalg.norm(f.scaling * f.B[:, j:] @ f.A[j:]) for j in range(k + 1)]
    np.testing.assert_allclose(t, want, atol=1e-9 * max(1.0, want[0]))
    U, S, Vt = lowrank_svd(f.B, f.A)
    q = min(m, n, k)
    assert U.shape == (m, q) and S.shape == (q,) and Vt.shape == (q, n)
    np.testing.assert_allclose((U * S) @ Vt, f.B @ f.A, atol=1e-9 * max(1.0, S.max(initial=0)))
    np.testing.assert_allclose(S, np.linalg.svd(f.B @ f.A, compute_uv=False)[:q], atol=1e-9 * max(1.0, S.max(initial=0)))
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(q), atol=1e-9)
    full = complete_rows(Vt, q + 3)
    used = min(q + 3, n)
    np.testing.assert_allclose(full[:used] @ full[:used].T, np.eye(used), atol=1e-9)
    np.testing.assert_array_equal(full[used:], 0.0)
    assert truncate_rank(f, 1 if k else 0).rank == min(k, 1)
    np.testing.assert_allclose(pad_rank(f, k + 2).delta(), f.delta())
