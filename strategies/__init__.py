"""Low-rank aggregation rules for federated LoRA, on plain numpy arrays.

    import strategies
    S = strategies.get("fedit")              # or "package.module:ClassName"
    state = S().initialize({"q": strategies.LoRAFactors(A, B, 2.0)})
    state = S().aggregate(state, updates)     # list of strategies.ClientUpdate
    state.effective_delta("q")               # residual + scaling * B @ A

One rule per file; each registers itself with :func:`register`. A user's own
rule is a :class:`Strategy` subclass, registered with the same decorator or
named as ``"package.module:ClassName"``; :func:`check_strategy` checks it
against the contract. Everything a rule author needs is importable from here:
the state types, the base class, the built-in rules (to subclass) and the
numeric helpers they share.
"""

from .base import Strategy
from .registry import UnknownStrategyError, available, describe, get, register
from .state import ClientUpdate, LoRAFactors, Payload, ServerState
from .utils import (
    detach,
    example_weights,
    lowrank_svd,
    pad_rank,
    seeded_rng,
    truncate_rank,
    weighted_mean,
    weighted_mean_extras,
    weighted_sum,
)

# The built-in rules: importing each module registers its rule.
from .fedit import FedIT  # noqa: E402  (first: FedExLoRA subclasses it)
from .fedex_lora import FedExLoRA
from .fedsa_lora import FedSALoRA
from .fedsvd import FedSVD
from .ffa_lora import FFALoRA
from .flora import FLoRA
from .hetlora import HetLoRA, RankTruncating
from .flexlora import FlexLoRA
from .ties import TIESMerging
from .coordinate_median import CoordinateMedian
from .trimmed_mean import TrimmedMean
from .norm_bounded_fedit import NormBoundedFedIT
from .testing import check_strategy

__all__ = [
    # state and contract
    "LoRAFactors",
    "ClientUpdate",
    "ServerState",
    "Payload",
    "Strategy",
    "check_strategy",
    # registry
    "UnknownStrategyError",
    "register",
    "get",
    "available",
    "describe",
    # built-in rules
    "FedIT",
    "FedExLoRA",
    "CoordinateMedian",
    "TrimmedMean",
    "NormBoundedFedIT",
    "FedSALoRA",
    "FedSVD",
    "FFALoRA",
    "FLoRA",
    "HetLoRA",
    "FlexLoRA",
    "RankTruncating",
    "TIESMerging",
    # helpers for rule authors
    "example_weights",
    "weighted_mean",
    "weighted_sum",
    "weighted_mean_extras",
    "seeded_rng",
    "detach",
    "pad_rank",
    "truncate_rank",
    "lowrank_svd",
]
