"""Small numpy helpers shared by the aggregation rules."""

from __future__ import annotations

import json
import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np

from .state import ClientUpdate, LoRAFactors, ServerState

__all__ = [
    "example_weights",
    "normalise",
    "weighted_mean",
    "weighted_sum",
    "weighted_mean_extras",
    "seeded_rng",
    "detach",
    "pad_rank",
    "truncate_rank",
    "tail_norms",
    "lowrank_svd",
    "complete_rows",
]


def example_weights(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """``p_i = n_i / sum(n)`` as float64; equal weights if every ``n_i`` is 0."""
    if len(updates) == 0:
        raise ValueError("no client updates to weight")
    return normalise([u.num_examples for u in updates])


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float], dtype=None) -> np.ndarray:
    """``sum_i w_i x_i / sum_i w_i``, accumulated in float64 in the given order,
    returned as ``dtype`` (default: the inputs' common dtype)."""
    if len(arrays) == 0:
        raise ValueError("weighted_mean of no arrays")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} arrays but {len(weights)} weights")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"cannot average arrays of different shapes {sorted(shapes)}")
    return weighted_sum(arrays, normalise(weights), dtype)


def normalise(weights: Sequence[float]) -> np.ndarray:
    """Weights scaled to sum to 1 (float64); equal weights if they sum to 0."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0:
        raise ValueError("no weights to normalise")
    total = w.sum()
    return w / total if total > 0 else np.full(len(w), 1.0 / len(w))


def weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float], dtype=None) -> np.ndarray:
    """``sum_i w_i x_i`` (weights used as given), accumulated in float64 in the
    given order, returned as ``dtype`` (default: the inputs' common dtype)."""
    if len(arrays) == 0 or len(arrays) != len(weights):
        raise ValueError(f"weighted_sum: {len(arrays)} arrays and {len(weights)} weights (need equal, > 0)")
    acc = np.zeros(arrays[0].shape, dtype=np.float64)
    for wi, a in zip(weights, arrays):
        acc += float(wi) * a.astype(np.float64, copy=False)
    return acc.astype(dtype or np.result_type(*arrays))


def weighted_mean_extras(
    state: ServerState, updates: Sequence[ClientUpdate], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Average each extra tensor over the clients that sent it (weights
    renormalised over them); keep the server's value where none did."""
    out: dict[str, np.ndarray] = {}
    for name in sorted(set(state.extras).union(*(u.extras for u in updates))):
        sent = [(u.extras[name], w) for u, w in zip(updates, weights) if name in u.extras]
        if sent:
            out[name] = weighted_mean([a for a, _ in sent], [w for _, w in sent])
        else:
            out[name] = state.extras[name]
    return out


def seeded_rng(seed: int, *salt: int | str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and ``salt`` (e.g. the round
    and a module name), never on call order or the process."""
    words = [int(seed) % 2**63]
    for s in salt:
        words.append(zlib.crc32(s.encode()) if isinstance(s, str) else int(s) % 2**63)
    return np.random.default_rng(np.random.SeedSequence(words))


def _arrays_of(state: ServerState | None, updates: Iterable[ClientUpdate] = ()) -> Iterable[np.ndarray]:
    if state is not None:
        for f in state.factors.values():
            yield from (f.A, f.B)
        yield from state.residuals.values()
        yield from state.extras.values()
        for fs in state.client_factors.values():
            for f in fs.values():
                yield from (f.A, f.B)
    for u in updates:
        for f in u.factors.values():
            yield from (f.A, f.B)
        yield from u.extras.values()


def detach(new: ServerState, old: ServerState, updates: Sequence[ClientUpdate]) -> ServerState:
    """Copy every array of ``new`` that is (or views) an array of the inputs,
    so later in-place edits of the result can never reach the inputs."""
    seen = {id(a) for a in _arrays_of(old, updates)}

    def own(a: np.ndarray) -> np.ndarray:
        return a.copy() if id(a) in seen or not a.flags.owndata else a

    def own_factors(fs: Mapping[str, LoRAFactors]) -> dict[str, LoRAFactors]:
        return {m: LoRAFactors(own(f.A), own(f.B), f.scaling) for m, f in fs.items()}

    return ServerState(
        factors=own_factors(new.factors),
        residuals={m: own(r) for m, r in new.residuals.items()},
        extras={n: own(x) for n, x in new.extras.items()},
        client_factors={c: own_factors(fs) for c, fs in new.client_factors.items()},
        round=new.round,
        meta=json.loads(json.dumps(new.meta)),  # a copy, and proof it is JSON
    )


# -- low-rank helpers (heterogeneous ranks, SVD re-factorisation) ---------------


def pad_rank(f: LoRAFactors, rank: int) -> LoRAFactors:
    """``f`` zero-padded to ``rank`` (extra rows of A, columns of B are 0);
    the product ``B @ A`` is unchanged. ``rank`` must be ``>= f.rank``."""
    if rank < f.rank:
        raise ValueError(f"cannot pad rank {f.rank} factors down to rank {rank}")
    extra = rank - f.rank
    if extra == 0:
        return f
    A = np.concatenate([f.A, np.zeros((extra, f.A.shape[1]), f.A.dtype)], axis=0)
    B = np.concatenate([f.B, np.zeros((f.B.shape[0], extra), f.B.dtype)], axis=1)
    return LoRAFactors(A, B, f.scaling)


def truncate_rank(f: LoRAFactors, rank: int) -> LoRAFactors:
    """The first ``rank`` components of ``f`` (rows of A, columns of B);
    ``f`` itself if it is not larger. The arrays may be views of ``f``'s."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank >= f.rank:
        return f
    return LoRAFactors(f.A[:rank], f.B[:, :rank], f.scaling)


def tail_norms(f: LoRAFactors) -> np.ndarray:
    """``t[k] = ||s * B[:, k:] @ A[k:]||_F`` for ``k = 0..r`` (``t[0]`` is the
    norm of the whole update, ``t[r] = 0``), from the ``r x r`` Gram matrices
    (no dense ``d_out x d_in`` product). float64."""
    A = f.A.astype(np.float64, copy=False)
    B = f.B.astype(np.float64, copy=False)
    G = (B.T @ B) * (A @ A.T)  # elementwise: sum(G[k:, k:]) = ||B_k: A_k:||^2
    r = f.rank
    sq = np.zeros(r + 1)
    for k in range(r - 1, -1, -1):  # add row and column k to the trailing block
        sq[k] = sq[k + 1] + G[k, k] + 2.0 * G[k, k + 1 :].sum()
    return abs(f.scaling) * np.sqrt(np.maximum(sq, 0.0))


def lowrank_svd(B: np.ndarray, A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD of ``B @ A`` (``B``: m x k, ``A``: k x n) in float64:
    ``U`` (m x q), ``S`` (q,) descending, ``Vt`` (q x n), ``q = min(m, n, k)``.

    With ``k < min(m, n)`` (the usual low-rank case) it uses QR of both
    factors and an SVD of the small ``k x k`` core, never forming ``B @ A``.
    """
    B = np.asarray(B, np.float64)
    A = np.asarray(A, np.float64)
    m, k = B.shape
    n = A.shape[1]
    if k == 0 or m == 0 or n == 0:
        q = min(m, n, k)
        return np.zeros((m, q)), np.zeros(q), np.zeros((q, n))
    if k >= min(m, n):
        U, S, Vt = np.linalg.svd(B @ A, full_matrices=False)
        return U, S, Vt
    Qb, Rb = np.linalg.qr(B)
    Qa, Ra = np.linalg.qr(A.T)
    u, S, vt = np.linalg.svd(Rb @ Ra.T)
    return Qb @ u, S, vt @ Qa.T


def complete_rows(Vt: np.ndarray, rank: int) -> np.ndarray:
    """``Vt`` (q x n, orthonormal rows) extended to ``rank`` rows: the new rows
    are orthonormal and orthogonal to ``Vt`` (a deterministic Gram-Schmidt of
    standard basis vectors), then zero rows once ``n`` rows are used up."""
    q, n = Vt.shape
    if rank <= q:
        return Vt[:rank]
    rows = [r for r in np.asarray(Vt, np.float64)]
    while len(rows) < min(rank, n):
        Q = np.array(rows).reshape(len(rows), n)
        j = int(np.argmin((Q**2).sum(axis=0))) if rows else 0  # least-covered axis
        v = np.zeros(n)
        v[j] = 1.0
        for _ in range(2):  # Gram-Schmidt twice for stability
            v = v - Q.T @ (Q @ v) if rows else v
        v /= np.linalg.norm(v)
        rows.append(v)
    out = np.zeros((rank, n))
    if rows:
        out[: len(rows)] = np.array(rows)
    return out
