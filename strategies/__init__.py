"""Low-rank aggregation rules for federated LoRA, on plain numpy arrays.

    import strategies
    S = strategies.get("fedit")              # or "package.module:ClassName"
    state = S().initialize({"q": strategies.LoRAFactors(A, B, 2.0)})
    state = S().aggregate(state, updates)     # list of strategies.ClientUpdate
    state.effective_delta("q")               # residual + scaling * B @ A

One rule per file; each registers itself with :func:`register`. A user's own
rule is a :class:`Strategy` subclass, registered with the same decorator or
named as ``"package.module:ClassName"``; :func:`strategies.testing.check_strategy`
checks it against the contract.
"""

from .base import Strategy
from .registry import UnknownStrategyError, available, describe, get, register
from .state import ClientUpdate, LoRAFactors, Payload, ServerState

# Built-in rules: importing a module registers it.
from . import fedit  # noqa: E402,F401  (isort: skip)

__all__ = [
    "LoRAFactors",
    "ClientUpdate",
    "ServerState",
    "Payload",
    "Strategy",
    "UnknownStrategyError",
    "register",
    "get",
    "available",
    "describe",
]
