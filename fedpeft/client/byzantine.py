"""Hostile (Byzantine) clients for robustness experiments: ``federation.byzantine_fraction`` and ``_attack``.

A seeded, fixed set of clients trains honestly and then sends a hostile
upload in place of its own: ``"scale"`` its update (upload minus what it was
sent) times ``federation.byzantine_strength``, ``"sign-flip"`` the same
reversed, ``"noise"`` Gaussian noise of ``byzantine_strength`` times the
honest update's RMS in place of the update. The set and the noise follow
``federation.seed``: this simulates an adversary for the robust rules to
face, it protects nothing, so the seed may be public.
"""

from __future__ import annotations

import functools

import numpy as np

from strategies import Payload

ATTACKS = ("scale", "sign-flip", "noise")


@functools.lru_cache(maxsize=8)
def hostile_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The ``round(fraction * num_clients)`` hostile clients (at least one when ``fraction > 0``)."""
    if fraction <= 0:
        return frozenset()
    count = min(num_clients, max(1, int(round(fraction * num_clients))))
    rng = np.random.default_rng([seed, 0xB12])
    return frozenset(int(c) for c in rng.choice(num_clients, count, replace=False))


def hostile_upload(local: Payload, received: Payload, attack: str, strength: float, rng: np.random.Generator) -> Payload:
    """What a hostile client sends instead of ``local``, trained from ``received``."""
    if attack not in ATTACKS:
        raise ValueError(f"federation.byzantine_attack = {attack!r}; choose one of {', '.join(ATTACKS)}")
    mine, sent = local.arrays(), received.arrays()
    out = {}
    for key, value in mine.items():
        origin = sent.get(key, np.zeros_like(value))
        delta = value.astype(np.float64) - origin
        if attack == "scale":
            new = origin + strength * delta
        elif attack == "sign-flip":
            new = origin - strength * delta
        else:
            rms = float(np.sqrt(np.mean(delta * delta))) if delta.size else 0.0
            new = origin + rng.normal(0.0, strength * rms, value.shape)
        out[key] = new.astype(value.dtype)
    return Payload.from_arrays(out, local.scalings())
