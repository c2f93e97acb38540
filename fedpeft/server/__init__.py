"""The Flower ServerApp and the adapter that runs fedpeft strategies inside Flower.

The names load on first use: the CLI imports :mod:`fedpeft.server.run_folder`
to check ``--out`` before anything heavy (torch, Flower, opacus) loads, so a
busy folder is refused in well under a second.
"""

from __future__ import annotations

import importlib

__all__ = ["FlowerLoRAStrategy", "make_server_app", "run_federation"]

_HOMES = {"FlowerLoRAStrategy": "fedpeft.server.flower_strategy", "make_server_app": "fedpeft.server.app",
          "run_federation": "fedpeft.server.app"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'fedpeft.server' has no attribute {name!r}")
