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

# Built-in rules, one per module: importing a module registers its rule.
import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

_INFRASTRUCTURE = {"base", "registry", "state", "testing", "utils"}
for _module in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    if _module not in _INFRASTRUCTURE and not _module.startswith("_"):
        _importlib.import_module(f"{__name__}.{_module}")

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
