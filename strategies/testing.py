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
    _Checker(S, params, clients, seed, skip).run(rounds)


class _Checker:
    """One :func:`check_strategy` call: the random federation and one method per check."""

    def __init__(self, S: type[Strategy], params: Mapping[str, Any], clients: int, seed: int, skip: Sequence[str]):
        self.S, self.params, self.skip = S, dict(params), set(skip)
        self.label = S.__dict__.get("name") or S.__name__
        self.s = self.make()
        self.rng = np.random.default_rng(seed)
        self.client_ids = [str(c) for c in range(clients - 1)] + [str(10 * clients)]  # "10" < "2": order matters
        self.client_ranks: dict[str, int] = {}

    # --- helpers -----------------------------------------------------------
    def make(self) -> Strategy:
        return self.S(**self.params)

    def on(self, check: str) -> bool:
        return check not in self.skip

    def fail(self, check: str, msg: str) -> None:
        raise AssertionError(f"check_strategy({self.label}) [{check}]: {msg}")

    def same(self, check: str, a: ServerState, b: ServerState, what: str) -> None:
        try:
            assert_states_equal(a, b, what)
        except AssertionError as e:
            self.fail(check, str(e))

    # --- the run -----------------------------------------------------------
    def run(self, rounds: int) -> None:
        if self.on("describe"):
            self.check_describe()
        state = self.initial_state()
        if self.on("empty"):
            self.check_empty(state)
        for rnd in range(rounds):
            updates = [self.client_update(state, rnd, cid) for cid in self.client_ids]
            snap_state, snap_updates = state.copy(), [_copy_update(u) for u in updates]
            new = self.s.aggregate(state, updates)
            if self.on("mutation"):
                self.check_mutation(state, snap_state, updates, snap_updates)
            if not isinstance(new, ServerState) or new.round != state.round + 1:
                self.fail("shapes", f"aggregate must return a ServerState with round {state.round + 1}")
            if self.on("shapes"):
                self.check_shapes(new)
            if self.on("exact") and self.S.exact:
                self.check_exact(state, new, updates, rnd)
            if self.on("determinism"):
                again = self.make().aggregate(snap_state.copy(), [_copy_update(u) for u in snap_updates])
                self.same("determinism", new, again, "two runs with the same inputs and seed")
            if self.on("order"):
                shuffled = [_copy_update(snap_updates[i]) for i in self.rng.permutation(len(snap_updates))]
                self.same("order", new, self.make().aggregate(snap_state.copy(), shuffled), "two update orders")
            if self.on("zero_examples"):
                self.check_zero_examples(snap_state, snap_updates)
            if self.on("checkpoint"):
                with tempfile.TemporaryDirectory() as d:
                    new.save(d)
                    self.same("checkpoint", new, ServerState.load(d), "state and its checkpoint")
            state = new

    def initial_state(self) -> ServerState:
        rng, s = self.rng, self.s
        init = {
            m: random_factors(rng, d_out, d_in, 3, scaling)
            for (m, (d_out, d_in)), scaling in zip(MODULES.items(), (2.0, 0.5))
        }
        head = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in EXTRAS.items()}
        if s.heterogeneous_ranks:  # ranks 1, 2, 3, 1, ...: at most the initial rank 3
            self.client_ranks = {cid: 1 + k % 3 for k, cid in enumerate(self.client_ids)}
            state = s.initialize(init, extras=head, client_ranks=self.client_ranks)
        else:
            state = s.initialize(init, extras=head)
        if not isinstance(state, ServerState):
            self.fail("shapes", f"initialize() returned {type(state).__name__}, not ServerState")
        if sorted(MODULES) != state.modules:
            self.fail("shapes", f"initialize() kept modules {state.modules}, expected {sorted(MODULES)}")
        return state

    # --- one check each ----------------------------------------------------
    def check_describe(self) -> None:
        s, S = self.s, self.S
        line = s.describe()
        if not isinstance(line, str) or not line.strip() or "\n" in line:
            self.fail("describe", f"describe() must be one non-empty line, got {line!r}")
        if "\n" in S.summary() or not S.summary().strip():
            self.fail("describe", f"summary() must be one non-empty line, got {S.summary()!r}")
        for m in MODULES:
            t = s.trainable(m)
            if set(t) != {"A", "B"} or not all(isinstance(v, bool) for v in t.values()):
                self.fail("describe", f"trainable({m!r}) must be {{'A': bool, 'B': bool}}, got {t!r}")

    def check_empty(self, state: ServerState) -> None:
        try:
            self.s.aggregate(state, [])
        except ValueError:
            pass
        else:
            self.fail("empty", "aggregate(state, []) must raise ValueError")

    def check_payload(self, state: ServerState, rnd: int, cid: str, payload: Payload) -> None:
        """Bytes of what is sent down, and the delta the client will use."""
        if self.on("bytes"):
            want = sum(a.nbytes for a in _payload_arrays(payload))
            flat = sum(a.nbytes for a in payload.arrays().values())
            if not payload.nbytes == want == flat:
                self.fail("bytes", f"payload for {cid}: nbytes {payload.nbytes}, arrays {want}, flat {flat}")
        if self.on("payload_delta"):
            for m, f in payload.factors.items():
                got = f.delta(np.float64) + payload.residuals.get(m, 0.0)
                want = state.effective_delta(m, cid, dtype=np.float64)
                if not np.allclose(got, want, rtol=1e-5, atol=1e-6):
                    self.fail("payload_delta", f"round {rnd}, client {cid}, {m}: payload's "
                              "residual + scaling * B @ A != state.effective_delta(m, client_id)")

    def client_update(self, state: ServerState, rnd: int, cid: str) -> ClientUpdate:
        """One client's round: its payload, random local training, upload and receipt."""
        s, rng = self.s, self.rng
        payload = s.payload_for(state, cid)
        self.check_payload(state, rnd, cid, payload)
        factors = {}
        for m, f in payload.factors.items():
            rank = self.client_ranks[cid] if s.heterogeneous_ranks else f.rank
            if self.on("ranks") and s.heterogeneous_ranks and f.rank != s.client_rank(state, cid, m):
                self.fail("ranks", f"round {rnd}: payload for client {cid} has rank {f.rank} for {m}, "
                          f"client_rank says {s.client_rank(state, cid, m)}")
            new = random_factors(rng, *f.shape, rank, f.scaling)
            t = s.trainable(m)
            A = new.A if t["A"] or rank != f.rank else f.A
            B = new.B if t["B"] or rank != f.rank else f.B
            factors[m] = LoRAFactors(A, B, f.scaling)
        extras = {n: x + rng.standard_normal(x.shape).astype(x.dtype) for n, x in payload.extras.items()}
        full = ClientUpdate(cid, factors, int(rng.integers(1, 100)), extras)
        sent = s.upload_arrays(full)
        if self.on("bytes"):
            self.check_upload(full, sent)
        update = s.receive(state, cid, sent, full.num_examples, {m: f.scaling for m, f in factors.items()})
        for key, a in sent.items():
            kind, name = key.split("/", 1)
            got = update.extras[name] if kind == "extra" else getattr(update.factors[name], kind[-1])
            if not np.array_equal(got, a):
                self.fail("bytes", f"receive() does not reproduce uploaded {key!r}")
        return update

    def check_upload(self, full: ClientUpdate, sent: Mapping[str, np.ndarray]) -> None:
        """Bytes of what is sent up, and that it is the update's own arrays."""
        s = self.s
        if s.upload_nbytes(full) != sum(a.nbytes for a in sent.values()):
            self.fail("bytes", f"upload_nbytes {s.upload_nbytes(full)} != size of upload_arrays")
        own = {**{f"lora_A/{m}": f.A for m, f in full.factors.items()},
               **{f"lora_B/{m}": f.B for m, f in full.factors.items()},
               **{f"extra/{n}": x for n, x in full.extras.items()}}
        for key, a in sent.items():
            if key not in own or not np.array_equal(a, own[key]):
                self.fail("bytes", f"upload_arrays sends {key!r}, which is not the update's own array")

    def check_mutation(self, state, snap_state, updates, snap_updates) -> None:
        self.same("mutation", state, snap_state, "state before/after aggregate (mutated input)")
        for u, v in zip(updates, snap_updates):
            self.same(
                "mutation",
                ServerState(factors=u.factors, extras=u.extras),
                ServerState(factors=v.factors, extras=v.extras),
                f"update of client {u.client_id} before/after aggregate (mutated input)",
            )

    def check_shapes(self, new: ServerState) -> None:
        for m in MODULES:
            for cid in [None, *self.client_ids]:
                d = new.effective_delta(m, cid)
                if d.shape != MODULES[m] or not np.all(np.isfinite(d)):
                    self.fail("shapes", f"effective_delta({m!r}, {cid!r}): shape {d.shape} or non-finite")
        for n, shape in EXTRAS.items():
            if new.extras.get(n, np.empty(0)).shape != shape:
                self.fail("shapes", f"extra {n!r} lost or changed shape")

    def check_exact(self, state: ServerState, new: ServerState, updates: Sequence[ClientUpdate], rnd: int) -> None:
        p = example_weights(updates)
        for m in MODULES:
            want = state.residuals.get(m, 0.0) + sum(
                pi * u.factors[m].delta(np.float64) for pi, u in zip(p, updates)
            )
            got = new.effective_delta(m, dtype=np.float64)
            if not np.allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max())):
                err = np.abs(got - want).max()
                self.fail("exact", f"{self.S.__name__}.exact is True but round {rnd}, {m}: max error {err:.3g}")

    def check_zero_examples(self, snap_state: ServerState, snap_updates: Sequence[ClientUpdate]) -> None:
        def with_n(n: int) -> list[ClientUpdate]:
            out = [_copy_update(u) for u in snap_updates]
            for u in out:
                u.num_examples = n
            return out

        zero = self.make().aggregate(snap_state.copy(), with_n(0))
        one = self.make().aggregate(snap_state.copy(), with_n(1))
        for m in MODULES:
            dz, d1 = zero.effective_delta(m, dtype=np.float64), one.effective_delta(m, dtype=np.float64)
            if not np.all(np.isfinite(dz)) or not np.allclose(dz, d1, rtol=1e-5, atol=1e-6):
                self.fail("zero_examples", f"all num_examples 0 must give finite, equal weights ({m})")
