"""HetLoRA: heterogeneous client ranks by zero-padding, norm-weighted averaging
and truncation, with server-side rank self-pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Strategy
from .registry import register
from .state import ClientUpdate, LoRAFactors, Payload, ServerState
from .utils import normalise, pad_rank, tail_norms, truncate_rank, weighted_sum

__all__ = ["HetLoRA", "RankTruncating"]

WEIGHTINGS = ("norm_examples", "norm", "examples")


@dataclass
class RankTruncating(Strategy):
    """Shared machinery of the heterogeneous-rank rules (not a rule itself).

    The global factors are kept at the largest rank; client ``c`` of rank
    ``r_c`` (``state.meta["client_ranks"][c]``) is sent the first ``r_c``
    components of them. Those truncations are also stored in
    ``state.client_factors`` so that ``state.effective_delta(m, c)`` is the
    delta that client actually uses. A client that uploads factors of another
    rank is taken to train at that rank from then on.
    """

    heterogeneous_ranks = True

    # -- client ranks --------------------------------------------------------
    def initialize(
        self,
        factors: Mapping[str, LoRAFactors],
        extras: Mapping[str, np.ndarray] | None = None,
        client_ranks: Mapping[str, int] | None = None,
    ) -> ServerState:
        """Round-0 state; ``client_ranks`` maps client id -> LoRA rank (absent
        clients use the global rank). The initial factors must be built at the
        largest client rank."""
        state = super().initialize(factors, extras, client_ranks)
        ranks = state.meta.get("client_ranks") or {}
        top = max((f.rank for f in state.factors.values()), default=0)
        for c, r in ranks.items():
            if r > top:
                raise ValueError(
                    f"{self.label}: client {c} has rank {r} but the initial adapter has rank {top}; "
                    f"build the initial adapter at the largest client rank"
                )
        meta = dict(state.meta)
        meta["client_ranks"] = dict(sorted(ranks.items()))
        return self._with_truncations(state.replace(meta=meta))

    def client_rank(self, state: ServerState, client_id: str, module: str) -> int:
        """Rank of ``module`` for ``client_id``: its configured (or last
        uploaded, or pruned) rank, capped at the global rank."""
        return min(super().client_rank(state, client_id, module), state.factors[module].rank)

    def payload_for(self, state: ServerState, client_id: str) -> Payload:
        """The global factors truncated to the client's rank, plus residuals
        and extras."""
        factors = {
            m: truncate_rank(f, self.client_rank(state, client_id, m)) for m, f in state.factors.items()
        }
        return Payload(factors=factors, residuals=dict(state.residuals), extras=dict(state.extras))

    def _with_truncations(self, state: ServerState) -> ServerState:
        """``client_factors`` rebuilt: the truncation of each module for every
        client whose rank is below the global one."""
        client_factors: dict[str, dict[str, LoRAFactors]] = {}
        for c in state.meta.get("client_ranks", {}):
            own = {}
            for m, f in state.factors.items():
                r = self.client_rank(state, c, m)
                if r < f.rank:
                    own[m] = truncate_rank(f, r)
            if own:
                client_factors[c] = own
        return state.replace(client_factors=client_factors)

    def _ranks_after(self, state: ServerState, new_ranks: Mapping[str, int]) -> dict[str, Any]:
        meta = dict(state.meta)
        ranks = dict(meta.get("client_ranks", {}))
        ranks.update({str(c): int(r) for c, r in new_ranks.items()})
        meta["client_ranks"] = dict(sorted(ranks.items()))
        return meta


def uploaded_rank(update: ClientUpdate) -> int:
    return max((f.rank for f in update.factors.values()), default=0)


@register("hetlora")
@dataclass
class HetLoRA(RankTruncating):
    """HetLoRA: heterogeneous ranks by zero-padding, norm-weighted averaging and truncation (inexact).

    Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
    Foundation Models" (EMNLP 2024). Clients train LoRA adapters of different
    ranks ``r_i`` (their resources differ). The server

    1. zero-pads every client's factors to the largest rank ``R`` (extra rows
       of ``A_i`` and columns of ``B_i`` are 0; ``B_i`` is scaled by
       ``s_i / s`` so that different scalings add up correctly);
    2. averages the padded factors with weights from the size of each
       client's update, ``||s_i B_i A_i||_F`` ("sparsity-weighted
       aggregation": a client whose update is small, e.g. because its rank is
       too large for its data, counts less);
    3. sends each client the first ``r_c`` components of the global factors.

    Like FedIT, averaging factors is not averaging products, so the rule is
    inexact; higher-rank components are also diluted by the lower-rank
    clients' zeros.

    Weighting (``weighting``): ``"norm_examples"`` (default) uses
    ``w_i ∝ n_i ||s_i B_i A_i||_F``, the paper's norm weights combined with
    FedAvg's example counts, so a client with more data and the same update
    size counts more; ``"norm"`` is the paper's ``w_i ∝ ||s_i B_i A_i||_F``;
    ``"examples"`` is plain ``w_i ∝ n_i``. If every norm is 0 the example
    weights are used. Norms are computed per module.

    Rank self-pruning (``prune_threshold > 0``): in the paper each client adds
    a regulariser on the norm of its tail rank components and drops them when
    they become small. That regulariser is part of the client's training loss
    and not of this numpy rule. The rule implements the pruning decision on
    the server: after a round, client ``i``'s rank becomes the smallest
    ``k >= min_rank`` with ``||s_i B_i[:, k:] A_i[k:]||_F <= prune_threshold *
    ||s_i B_i A_i||_F`` (norms summed in squares over its modules); its update
    is truncated to ``k`` before aggregation and ``state.meta["client_ranks"]``
    records ``k``, so its next payload has rank ``k``. Extras (classifier
    head) are averaged by examples.

    Parameters
    ----------
    weighting : {"norm_examples", "norm", "examples"}
        How client weights are formed (see above).
    prune_threshold : float
        Relative tail norm under which a client's tail ranks are pruned;
        0 disables pruning.
    min_rank : int
        Pruning never goes below this rank.
    """

    client_dp_unsafe = (
        "it weights clients by the norms of their own updates, so one client moves the aggregate by more than clip / clients"
    )

    weighting: str = "norm_examples"
    prune_threshold: float = 0.0
    min_rank: int = 1

    exact = False

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"strategy.weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}"
            )
        if not 0.0 <= float(self.prune_threshold) < 1.0:
            raise ValueError(f"strategy.prune_threshold must be in [0, 1), got {self.prune_threshold!r}")
        if int(self.min_rank) < 1:
            raise ValueError(f"strategy.min_rank must be >= 1, got {self.min_rank!r}")

    def pruned_rank(self, update: ClientUpdate) -> int:
        """The rank ``update``'s client keeps after self-pruning (its uploaded
        rank when pruning is off or its update is 0)."""
        r = uploaded_rank(update)
        if self.prune_threshold <= 0 or r <= self.min_rank:
            return r
        sq = np.zeros(r + 1)
        for f in update.factors.values():
            t = tail_norms(f)
            sq[: len(t)] += t**2  # modules of lower rank add 0 to longer tails
        total = np.sqrt(sq[0])
        if not total > 0:
            return r
        tails = np.sqrt(sq)
        for k in range(int(self.min_rank), r + 1):
            if tails[k] <= self.prune_threshold * total:
                return k
        return r

    def client_weights(self, fs: Sequence[LoRAFactors], p: np.ndarray) -> np.ndarray:
        """Aggregation weights of one module's client factors ``fs`` whose
        example weights are ``p`` (summing to 1)."""
        if self.weighting == "examples":
            return p
        norms = np.array([tail_norms(f)[0] for f in fs])
        w = norms * (p if self.weighting == "norm_examples" else 1.0)
        return normalise(w) if w.sum() > 0 else p

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        ranks = {u.client_id: self.pruned_rank(u) for u in updates}
        factors = dict(state.factors)
        for m, old in state.factors.items():
            sent = [(truncate_rank(u.factors[m], ranks[u.client_id]), w)
                    for u, w in zip(updates, weights) if m in u.factors]
            if not sent:
                continue
            fs = [f for f, _ in sent]
            s = old.scaling
            if s == 0:
                raise ValueError(f"{self.label}: module {m!r} has scaling 0")
            w = self.client_weights(fs, normalise([w for _, w in sent]))
            R = max([old.rank] + [f.rank for f in fs])
            padded = [pad_rank(f, R) for f in fs]
            dtype = np.result_type(old.A, old.B, *[a for f in fs for a in (f.A, f.B)])
            A = weighted_sum([f.A for f in padded], w, dtype)
            B = weighted_sum([f.B for f in padded], [wi * f.scaling / s for wi, f in zip(w, fs)], dtype)
            factors[m] = LoRAFactors(A, B, s)
        new = state.replace(factors=factors, meta=self._ranks_after(state, ranks))
        return self._with_truncations(new)
