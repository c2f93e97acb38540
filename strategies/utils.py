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
