"""Conformance checks for strategies, usable on your own class.

    from strategies.testing import check_strategy
    check_strategy(MyRule, lr=0.5)      # raises AssertionError on a violation
"""

from __future__ import annotations

import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Strategy
from .state import ClientUpdate, LoRAFactors, Payload, ServerState
from .utils import example_weights

__all__ = ["check_strategy", "assert_states_equal", "random_factors"]

CHECKS = (
    "describe",
    "empty",
    "bytes",
    "payload_delta",
    "mutation",
    "shapes",
    "ranks",
    "exact",
    "determinism",
    "order",
    "zero_examples",
    "checkpoint",
)

MODULES = {"layer0.q": (5, 7), "layer1.v": (6, 4)}  # name: (d_out, d_in)
EXTRAS = {"head.weight": (2, 6), "head.bias": (2,)}


def random_factors(
    rng: np.random.Generator, d_out: int, d_in: int, rank: int, scaling: float, dtype=np.float32
) -> LoRAFactors:
    """Gaussian factors (B nonzero, so products are not trivial)."""
    return LoRAFactors(
        rng.standard_normal((rank, d_in)).astype(dtype),
        rng.standard_normal((d_out, rank)).astype(dtype),
        scaling,
    )


def assert_states_equal(a: ServerState, b: ServerState, what: str = "states") -> None:
    """Raise AssertionError unless two states are bit-identical (dtypes,
    values, scalings, round, meta)."""

    def arrays(x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], where: str) -> None:
        if set(x) != set(y):
            raise AssertionError(f"{what} differ in {where} keys: {sorted(x)} vs {sorted(y)}")
        for k in x:
            if x[k].dtype != y[k].dtype or x[k].shape != y[k].shape or not np.array_equal(x[k], y[k]):
                raise AssertionError(f"{what} differ at {where}[{k!r}]")

    def factors(x: Mapping[str, LoRAFactors], y: Mapping[str, LoRAFactors], where: str) -> None:
        arrays({m: f.A for m, f in x.items()}, {m: f.A for m, f in y.items()}, where + ".A")
        arrays({m: f.B for m, f in x.items()}, {m: f.B for m, f in y.items()}, where + ".B")
        for m in x:
            if x[m].scaling != y[m].scaling:
                raise AssertionError(
                    f"{what} differ at {where}[{m!r}].scaling: {x[m].scaling} vs {y[m].scaling}"
                )

    factors(a.factors, b.factors, "factors")
    arrays(a.residuals, b.residuals, "residuals")
    arrays(a.extras, b.extras, "extras")
    if set(a.client_factors) != set(b.client_factors):
        raise AssertionError(f"{what} differ in client_factors clients")
    for c in a.client_factors:
        factors(a.client_factors[c], b.client_factors[c], f"client_factors[{c!r}]")
    if a.round != b.round:
        raise AssertionError(f"{what} differ in round: {a.round} vs {b.round}")
    if a.meta != b.meta:
        raise AssertionError(f"{what} differ in meta: {a.meta!r} vs {b.meta!r}")


def _copy_update(u: ClientUpdate) -> ClientUpdate:
    return ClientUpdate(
        u.client_id,
        {m: f.copy() for m, f in u.factors.items()},
        u.num_examples,
        {n: x.copy() for n, x in u.extras.items()},
        dict(u.metrics),
    )


def _payload_arrays(p: Payload) -> list[np.ndarray]:
    factors = [a for f in p.factors.values() for a in (f.A, f.B)]
    return factors + list(p.residuals.values()) + list(p.extras.values())


def check_strategy(
    S: type[Strategy] | Strategy,
    params: Mapping[str, Any] | None = None,
    *,
    clients: int = 4,
    rounds: int = 2,
    seed: int = 0,
    skip: Sequence[str] = (),
    **kwargs: Any,
) -> None:
    """Check a strategy class against the contract; raise AssertionError.

    Builds a seeded random federation (two modules, a classifier head,
    ``clients`` clients, ``rounds`` rounds; heterogeneous ranks if the class
    says it supports them, passed as ``initialize(..., client_ranks=...)``)
    in which each client starts from its payload, and
    checks: one-line description; empty update list raises ValueError; bytes
    down/up equal the sizes of the arrays sent, and what is uploaded is the
    update's own arrays; the payload's delta matches ``effective_delta`` for
    that client; inputs are not mutated; shapes and finiteness; payloads at
    ``S.client_rank`` for heterogeneous-rank rules; exactness if
    ``S.exact``; determinism across instances; independence of update order;
    no NaN when every ``num_examples`` is 0; exact checkpoint round trip.

    Parameters
    ----------
    S : Strategy subclass or instance
        The rule to check (an instance contributes its ``params()``).
    params, **kwargs : strategy parameters (merged; kwargs win).
    clients, rounds, seed : size of the random federation and its seed.
    skip : names from ``strategies.testing.CHECKS`` to leave out.
    """
    if isinstance(S, Strategy):
        params = {**S.params(), **(params or {})}
        S = type(S)
    params = {**(params or {}), **kwargs}
    unknown = set(skip) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks to skip {sorted(unknown)}; valid: {', '.join(CHECKS)}")
    label = S.__dict__.get("name") or S.__name__

    def fail(check: str, msg: str) -> None:
        raise AssertionError(f"check_strategy({label}) [{check}]: {msg}")

    def same(check: str, a: ServerState, b: ServerState, what: str) -> None:
        try:
            assert_states_equal(a, b, what)
        except AssertionError as e:
            fail(check, str(e))

    def on(check: str) -> bool:
        return check not in skip

    def make() -> Strategy:
        return S(**params)

    s = make()
    rng = np.random.default_rng(seed)

    if on("describe"):
        line = s.describe()
        if not isinstance(line, str) or not line.strip() or "\n" in line:
            fail("describe", f"describe() must be one non-empty line, got {line!r}")
        if "\n" in S.summary() or not S.summary().strip():
            fail("describe", f"summary() must be one non-empty line, got {S.summary()!r}")
        for m in MODULES:
            t = s.trainable(m)
            if set(t) != {"A", "B"} or not all(isinstance(v, bool) for v in t.values()):
                fail("describe", f"trainable({m!r}) must be {{'A': bool, 'B': bool}}, got {t!r}")

    init = {
        m: random_factors(rng, d_out, d_in, 3, scaling)
        for (m, (d_out, d_in)), scaling in zip(MODULES.items(), (2.0, 0.5))
    }
    head = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in EXTRAS.items()}
    client_ids = [str(c) for c in range(clients - 1)] + [str(10 * clients)]  # "10" < "2": order matters
    if s.heterogeneous_ranks:  # ranks 1, 2, 3, 1, ...: at most the initial rank 3
        client_ranks = {cid: 1 + k % 3 for k, cid in enumerate(client_ids)}
        state = s.initialize(init, extras=head, client_ranks=client_ranks)
    else:
        state = s.initialize(init, extras=head)
    if not isinstance(state, ServerState):
        fail("shapes", f"initialize() returned {type(state).__name__}, not ServerState")
    if sorted(MODULES) != state.modules:
        fail("shapes", f"initialize() kept modules {state.modules}, expected {sorted(MODULES)}")

    if on("empty"):
        try:
            s.aggregate(state, [])
        except ValueError:
            pass
        else:
            fail("empty", "aggregate(state, []) must raise ValueError")

    for rnd in range(rounds):
        updates = []
        for k, cid in enumerate(client_ids):
            payload = s.payload_for(state, cid)
            if on("bytes"):
                want = sum(a.nbytes for a in _payload_arrays(payload))
                flat = sum(a.nbytes for a in payload.arrays().values())
                if not payload.nbytes == want == flat:
                    fail("bytes", f"payload for {cid}: nbytes {payload.nbytes}, arrays {want}, flat {flat}")
            if on("payload_delta"):
                for m, f in payload.factors.items():
                    got = f.delta(np.float64) + payload.residuals.get(m, 0.0)
                    want = state.effective_delta(m, cid, dtype=np.float64)
                    if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                        fail("payload_delta", f"round {rnd}, client {cid}, {m}: payload's "
                             "residual + scaling * B @ A != state.effective_delta(m, client_id)")
            factors = {}
            for m, f in payload.factors.items():
                rank = client_ranks[cid] if s.heterogeneous_ranks else f.rank
                if on("ranks") and s.heterogeneous_ranks and f.rank != s.client_rank(state, cid, m):
                    fail("ranks", f"round {rnd}: payload for client {cid} has rank {f.rank} for {m}, "
                         f"client_rank says {s.client_rank(state, cid, m)}")
                new = random_factors(rng, *f.shape, rank, f.scaling)
                t = s.trainable(m)
                A = new.A if t["A"] or rank != f.rank else f.A
                B = new.B if t["B"] or rank != f.rank else f.B
                factors[m] = LoRAFactors(A, B, f.scaling)
            extras = {n: x + rng.standard_normal(x.shape).astype(x.dtype) for n, x in payload.extras.items()}
            full = ClientUpdate(cid, factors, int(rng.integers(1, 100)), extras)
            sent = s.upload_arrays(full)
            if on("bytes"):
                if s.upload_nbytes(full) != sum(a.nbytes for a in sent.values()):
                    fail("bytes", f"upload_nbytes {s.upload_nbytes(full)} != size of upload_arrays")
                own = {**{f"lora_A/{m}": f.A for m, f in factors.items()},
                       **{f"lora_B/{m}": f.B for m, f in factors.items()},
                       **{f"extra/{n}": x for n, x in extras.items()}}
                for key, a in sent.items():
                    if key not in own or not np.array_equal(a, own[key]):
                        fail("bytes", f"upload_arrays sends {key!r}, which is not the update's own array")
            scalings = {m: f.scaling for m, f in factors.items()}
            update = s.receive(state, cid, sent, full.num_examples, scalings)
            for key, a in sent.items():
                kind, name = key.split("/", 1)
                got = update.extras[name] if kind == "extra" else getattr(update.factors[name], kind[-1])
                if not np.array_equal(got, a):
                    fail("bytes", f"receive() does not reproduce uploaded {key!r}")
            updates.append(update)

        snap_state, snap_updates = state.copy(), [_copy_update(u) for u in updates]
        new = s.aggregate(state, updates)

        if on("mutation"):
            same("mutation", state, snap_state, "state before/after aggregate (mutated input)")
            for u, v in zip(updates, snap_updates):
                same(
                    "mutation",
                    ServerState(factors=u.factors, extras=u.extras),
                    ServerState(factors=v.factors, extras=v.extras),
                    f"update of client {u.client_id} before/after aggregate (mutated input)",
                )
        if not isinstance(new, ServerState) or new.round != state.round + 1:
            fail("shapes", f"aggregate must return a ServerState with round {state.round + 1}")
        if on("shapes"):
            for m in MODULES:
                for cid in [None, *client_ids]:
                    d = new.effective_delta(m, cid)
                    if d.shape != MODULES[m] or not np.all(np.isfinite(d)):
                        fail("shapes", f"effective_delta({m!r}, {cid!r}): shape {d.shape} or non-finite")
            for n, shape in EXTRAS.items():
                if new.extras.get(n, np.empty(0)).shape != shape:
                    fail("shapes", f"extra {n!r} lost or changed shape")
        if on("exact") and S.exact:
            p = example_weights(updates)
            for m in MODULES:
                want = state.residuals.get(m, 0.0) + sum(
                    pi * u.factors[m].delta(np.float64) for pi, u in zip(p, updates)
                )
                got = new.effective_delta(m, dtype=np.float64)
                if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max())):
                    err = np.abs(got - want).max()
                    fail("exact", f"{S.__name__}.exact is True but round {rnd}, {m}: max error {err:.3g}")
        if on("determinism"):
            again = make().aggregate(snap_state.copy(), [_copy_update(u) for u in snap_updates])
            same("determinism", new, again, "two runs with the same inputs and seed")
        if on("order"):
            shuffled = [_copy_update(snap_updates[i]) for i in rng.permutation(len(snap_updates))]
            same("order", new, make().aggregate(snap_state.copy(), shuffled), "two update orders")
        if on("zero_examples"):
            def with_n(n: int) -> list[ClientUpdate]:
                out = [_copy_update(u) for u in snap_updates]
                for u in out:
                    u.num_examples = n
                return out
            zero = make().aggregate(snap_state.copy(), with_n(0))
            one = make().aggregate(snap_state.copy(), with_n(1))
            for m in MODULES:
                dz, d1 = zero.effective_delta(m, dtype=np.float64), one.effective_delta(m, dtype=np.float64)
                if not np.all(np.isfinite(dz)) or not np.allclose(dz, d1, rtol=1e-5, atol=1e-6):
                    fail("zero_examples", f"all num_examples 0 must give finite, equal weights ({m})")
        if on("checkpoint"):
            with tempfile.TemporaryDirectory() as d:
                new.save(d)
                same("checkpoint", new, ServerState.load(d), "state and its checkpoint")
        state = new
