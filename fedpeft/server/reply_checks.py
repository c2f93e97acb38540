"""Every train reply checked before a rule sees it: a bad reply is rejected with its reason, never aggregated.

What a client must upload follows from what it was sent: the strategy's
:meth:`~strategies.Strategy.upload_arrays` of the payload the server sent
that client (its rank, the parts the rule uploads, the head when the rule
sends it back). A reply is rejected when its arrays cannot be decoded, a key
is missing or unexpected, a shape or dtype differs from what was sent, a
value is NaN or infinite, the update (upload minus what was sent) is longer
than ``federation.max_update_norm`` (0 = no bound), or its ``num-examples``
is not a positive integer. Nothing here raises: the server logs the reason
in the round's ``failed`` list and goes on with the other clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

import numpy as np

from strategies import ClientUpdate, ServerState
from strategies import Strategy as LoRAStrategy


def expected_upload(strategy: LoRAStrategy, state: ServerState, client_id: str) -> dict[str, np.ndarray]:
    """The arrays ``client_id`` uploads if it is honest, at the values it was sent (its update's origin)."""
    sent = strategy.payload_for(state, client_id)
    return strategy.upload_arrays(ClientUpdate(client_id, dict(sent.factors), 1, dict(sent.extras), {}))


def num_examples_problem(value) -> str | None:
    """Why ``value`` is not a usable example count (None when it is)."""
    if value is None:
        return "no num-examples in the reply"
    if isinstance(value, bool) or not isinstance(value, Real):
        return f"num-examples = {value!r} is not a number"
    if not isinstance(value, Integral) and not (math.isfinite(value) and float(value).is_integer()):
        return f"num-examples = {value!r} is not a whole number"
    if value < 1:
        return f"num-examples = {value!r} is not positive"
    return None


def upload_problem(arrays: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                   max_update_norm: float = 0.0) -> str | None:
    """Why ``arrays`` is not an upload that fits ``expected`` (None when it is); see the module docstring."""
    missing = sorted(set(expected) - set(arrays))
    if missing:
        return f"missing {len(missing)} array(s), e.g. {missing[0]!r}"
    unexpected = sorted(set(arrays) - set(expected))
    if unexpected:
        return f"{len(unexpected)} unexpected array(s), e.g. {unexpected[0]!r}"
    squared = 0.0
    for key, want in expected.items():
        got = arrays[key]
        if not isinstance(got, np.ndarray):
            return f"{key}: not an array ({type(got).__name__})"
        if got.dtype != want.dtype:
            return f"{key}: dtype {got.dtype}, expected {want.dtype}"
        if got.shape != want.shape:
            return f"{key}: shape {got.shape}, expected {want.shape}"
        if not np.isfinite(got).all():
            return f"{key}: {int((~np.isfinite(got)).sum())} NaN or infinite value(s)"
        squared += float(np.sum((got.astype(np.float64) - want) ** 2))
    norm = math.sqrt(squared)
    if not math.isfinite(norm):
        return "the update's norm overflows"
    if max_update_norm > 0 and norm > max_update_norm:
        return f"update norm {norm:.4g} exceeds federation.max_update_norm = {max_update_norm:g}"
    return None
