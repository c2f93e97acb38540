"""The strategy interface every aggregation rule implements.

A strategy is a plain Python class on numpy arrays. The round trip, as the
Flower adapter runs it::

    state = strategy.initialize(model_factors, extras=head)       # round 0
    for each round:
        payload = strategy.payload_for(state, cid)                 # server -> client
        ... client sets payload.residuals/factors/extras, trains
            the parts strategy.trainable(module) says, builds a ClientUpdate ...
        arrays = strategy.upload_arrays(update)                    # client -> server
        update = strategy.receive(state, cid, arrays, n, scalings) # server side
        state = strategy.aggregate(state, updates)

Bytes are ``payload.nbytes`` down and ``strategy.upload_nbytes(update)`` up:
both are the sizes of the arrays that actually cross the wire.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .state import ClientUpdate, LoRAFactors, Payload, ServerState, flat_key, split_key
from .utils import detach, example_weights, normalise, seeded_rng, weighted_mean_extras

__all__ = ["Strategy"]

PARTS = ("A", "B")


@dataclass
class Strategy:
    """Base class of all low-rank aggregation rules.

    Subclass it as a dataclass (fields are the strategy's parameters, each with
    a default; ``seed`` is inherited) and implement :meth:`aggregate_factors`.
    Everything else has a FedAvg-like default that a rule overrides only where
    it differs.

    Parameters
    ----------
    seed : int
        Seeds every random choice the rule makes (see :meth:`rng`); the same
        inputs and seed give bit-identical outputs.

    Attributes
    ----------
    name : str
        Registry name, set by :func:`strategies.register`.
    exact : bool
        True if, after each round, ``state.effective_delta(m)`` equals the
        previous round's residual plus ``sum_i p_i s_i B_i @ A_i`` (the exact
        weighted mean of the clients' adapter updates). Checked by
        :func:`strategies.testing.check_strategy`.
    heterogeneous_ranks : bool
        True if clients may return factors of a rank other than the one they
        were sent. Such a rule takes ``client_ranks`` in :meth:`initialize`
        and its :meth:`payload_for` sends each client factors at
        :meth:`client_rank`.
    train_parts : tuple of {"A", "B"}
        Factors clients train; the others stay frozen (FFA-LoRA: ``("B",)``).
    upload_parts : tuple of {"A", "B"}
        Factors clients send back; the server fills the others from the
        payload it sent (see :meth:`receive`).
    upload_extras : bool
        Whether clients send their extra tensors (classifier head).
    personalised : bool
        True if each client uses its own model (per-client factors), so a
        federation also reports each client's accuracy on its own data.
    client_dp_unsafe : str or None
        Why client-level DP (Flower's central-DP wrappers: clip each client's
        upload, add noise to the aggregate) would not protect this rule's
        output, or None if it does: the new global arrays must be the uniform
        mean of the clients' uploaded arrays, everything else unchanged.
        ``dp.mode = "client"`` refuses a rule with a reason.
    """

    seed: int = 0

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    heterogeneous_ranks: ClassVar[bool] = False
    train_parts: ClassVar[tuple[str, ...]] = PARTS
    upload_parts: ClassVar[tuple[str, ...]] = PARTS
    upload_extras: ClassVar[bool] = True
    personalised: ClassVar[bool] = False
    client_dp_unsafe: ClassVar[str | None] = (
        "it does not declare its aggregate a plain mean of the uploaded arrays (client_dp_unsafe = None)"
    )

    # -- description and parameters -------------------------------------------
    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = inspect.getdoc(cls) or ""
        return doc.strip().splitlines()[0].strip() if doc.strip() else cls.__name__

    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the constructor's keyword parameters."""
        return [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]

    @classmethod
    def from_params(cls, params: Mapping[str, Any] | None = None) -> "Strategy":
        """Build from a config mapping; an unknown key raises ``ValueError``
        naming it and the valid ones."""
        params = dict(params or {})
        sig = inspect.signature(cls)
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            valid = cls.param_names()
            unknown = sorted(set(params) - set(valid))
            if unknown:
                raise ValueError(
                    f"unknown parameter strategy.{unknown[0]} for strategy "
                    f"{cls.name or cls.__name__!r}; valid: {', '.join(valid) or '(none)'}"
                )
        return cls(**params)

    def params(self) -> dict[str, Any]:
        """The parameters this instance was built with."""
        return {n: getattr(self, n) for n in self.param_names() if hasattr(self, n)}

    def describe(self) -> str:
        """One line: name, parameters and summary."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.label}({args}): {self.summary()}"

    @property
    def label(self) -> str:
        return self.name or type(self).__name__

    def trainable(self, module: str) -> dict[str, bool]:
        """Which factors of ``module`` the client trains, e.g.
        ``{"A": False, "B": True}`` for FFA-LoRA. Default: ``train_parts``."""
        return {p: p in self.train_parts for p in PARTS}

    def rng(self, round: int, *salt: int | str) -> np.random.Generator:
        """Random generator for one decision, from ``(seed, round, *salt)``."""
        return seeded_rng(self.seed, round, *salt)

    # -- server state ---------------------------------------------------------
    def initialize(
        self,
        factors: Mapping[str, LoRAFactors],
        extras: Mapping[str, np.ndarray] | None = None,
        client_ranks: Mapping[str, int] | None = None,
    ) -> ServerState:
        """Round-0 state from the model's initial adapter (copied).

        Parameters
        ----------
        factors : dict[str, LoRAFactors]
            The model's initial adapter, per module. With heterogeneous client
            ranks a rule may keep the global factors at the largest rank.
        extras : dict[str, np.ndarray], optional
            Other trainable tensors (classifier head).
        client_ranks : dict[str, int], optional
            Client id -> LoRA rank that client trains at (heterogeneous
            ranks). Stored as ``state.meta["client_ranks"]`` (a JSON dict
            ``str -> int``) and read back with :meth:`client_rank`; a
            heterogeneous-rank rule's :meth:`payload_for` sends each client
            factors at its rank.
        """
        for m, f in factors.items():
            if not isinstance(f, LoRAFactors):
                raise TypeError(f"factors[{m!r}] must be LoRAFactors, got {type(f).__name__}")
        meta: dict[str, Any] = {}
        if client_ranks is not None:
            meta["client_ranks"] = self._check_client_ranks(client_ranks)
        return ServerState(
            factors={m: f.copy() for m, f in factors.items()},
            extras={n: np.array(x, copy=True) for n, x in (extras or {}).items()},
            meta=meta,
        )

    def _check_client_ranks(self, client_ranks: Mapping[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for cid, r in dict(client_ranks).items():
            if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) < 1:
                raise ValueError(
                    f"{self.label}: client_ranks[{str(cid)!r}] must be a positive integer, got {r!r}"
                )
            out[str(cid)] = int(r)
        return dict(sorted(out.items()))

    def client_rank(self, state: ServerState, client_id: str, module: str) -> int:
        """The LoRA rank ``client_id`` trains ``module`` at:
        ``state.meta["client_ranks"][client_id]`` if the federation has
        heterogeneous ranks and names this client, else the rank of the global
        factors of ``module``."""
        ranks = state.meta.get("client_ranks") or {}
        if str(client_id) in ranks:
            return int(ranks[str(client_id)])
        if module not in state.factors:
            raise KeyError(f"unknown module {module!r}; modules: {', '.join(state.factors) or '(none)'}")
        return state.factors[module].rank

    def aggregate(self, state: ServerState, updates: Iterable[ClientUpdate]) -> ServerState:
        """One server round: the new state from the clients' updates.

        Updates are sorted by ``client_id`` first, so arrival order never
        changes the result. Inputs are never modified and the result shares no
        array with them.

        Raises
        ------
        ValueError
            No updates, duplicate client ids, unknown modules or extras, or
            shapes that do not match the server state.
        """
        updates = sorted(updates, key=lambda u: u.client_id)
        if not updates:
            raise ValueError(f"{self.label}: aggregate needs at least one client update, got none")
        self.validate(state, updates)
        weights = self.weights(updates)
        new = self.aggregate_factors(state, updates, weights)
        new = new.replace(extras=self.aggregate_extras(state, updates, weights), round=state.round + 1)
        return detach(new, state, updates)

    def weights(self, updates: Sequence[ClientUpdate]) -> np.ndarray:
        """Client weights ``p_i = n_i / sum(n)`` (equal if all are 0)."""
        return example_weights(updates)

    @staticmethod
    def module_updates(
        state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> Iterator[tuple[str, LoRAFactors, list[LoRAFactors], np.ndarray]]:
        """Per module some client sent: ``(module, current global factors, the
        clients' factors, their weights renormalised over those clients)``."""
        for m, old in state.factors.items():
            sent = [(u.factors[m], w) for u, w in zip(updates, weights) if m in u.factors]
            if sent:
                yield m, old, [f for f, _ in sent], normalise([w for _, w in sent])

    def aggregate_factors(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> ServerState:
        """The rule itself: new factors, residuals, client factors and meta.

        ``updates`` are validated and sorted, ``weights`` sum to 1. Return a
        new :class:`ServerState` (extras and round are filled in by
        :meth:`aggregate`); never write into the inputs.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement aggregate_factors")

    def aggregate_extras(
        self, state: ServerState, updates: Sequence[ClientUpdate], weights: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Extra tensors (classifier head): weighted mean by default."""
        return weighted_mean_extras(state, updates, weights)

    def validate(self, state: ServerState, updates: Sequence[ClientUpdate]) -> None:
        """Raise ``ValueError`` if the updates do not fit the state."""
        seen: set[str] = set()
        for u in updates:
            if u.client_id in seen:
                raise ValueError(f"{self.label}: client {u.client_id} sent two updates in one round")
            seen.add(u.client_id)
            for m, f in u.factors.items():
                if m not in state.modules:
                    raise ValueError(
                        f"{self.label}: client {u.client_id} sent unknown module {m!r}; "
                        f"modules: {', '.join(state.modules) or '(none)'}"
                    )
                if f.shape != state.module_shape(m):
                    raise ValueError(
                        f"{self.label}: client {u.client_id} sent {m!r} for a {f.shape} weight, "
                        f"server has {state.module_shape(m)}"
                    )
                ref = state.factors_for(m, u.client_id)
                if not self.heterogeneous_ranks and ref is not None and f.rank != ref.rank:
                    raise ValueError(
                        f"{self.label}: client {u.client_id} sent rank {f.rank} for {m!r} but was "
                        f"sent rank {ref.rank}; this strategy needs equal ranks (pick one that "
                        f"supports heterogeneous ranks)"
                    )
            for n, x in u.extras.items():
                if n not in state.extras:
                    raise ValueError(
                        f"{self.label}: client {u.client_id} sent unknown extra tensor {n!r}; "
                        f"extras: {', '.join(sorted(state.extras)) or '(none)'}"
                    )
                if x.shape != state.extras[n].shape:
                    raise ValueError(
                        f"{self.label}: client {u.client_id} sent {n!r} of shape {x.shape}, "
                        f"server has {state.extras[n].shape}"
                    )

    # -- what crosses the wire ------------------------------------------------
    def payload_for(self, state: ServerState, client_id: str) -> Payload:
        """What the server sends ``client_id`` for the next round. Default:
        per module the client's kept factors, else the global ones; all
        residuals; all extras."""
        factors = {}
        for m in state.factors:
            f = state.factors_for(m, client_id)
            if f is not None:
                factors[m] = f
        return Payload(factors=factors, residuals=dict(state.residuals), extras=dict(state.extras))

    def upload_arrays(self, update: ClientUpdate) -> dict[str, np.ndarray]:
        """The arrays the client actually sends, flat
        (``lora_A/<module>``, ``lora_B/<module>``, ``extra/<name>``): the
        ``upload_parts`` of each module, plus extras if ``upload_extras``."""
        out: dict[str, np.ndarray] = {}
        for m, f in update.factors.items():
            for part in self.upload_parts:
                out[flat_key("lora_" + part, m)] = getattr(f, part)
        if self.upload_extras:
            for n, x in update.extras.items():
                out[flat_key("extra", n)] = x
        return out

    def upload_nbytes(self, update: ClientUpdate) -> int:
        """Bytes the client uploads: the sizes of :meth:`upload_arrays`."""
        return int(sum(a.nbytes for a in self.upload_arrays(update).values()))

    def receive(
        self,
        state: ServerState,
        client_id: str,
        arrays: Mapping[str, np.ndarray],
        num_examples: int,
        scalings: Mapping[str, float] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> ClientUpdate:
        """Rebuild a :class:`ClientUpdate` from uploaded arrays (server side).

        Factors not uploaded (not in ``upload_parts``) are the ones the server
        sent in :meth:`payload_for`. Scalings default to the payload's.
        """
        client_id = str(client_id)
        parts: dict[str, dict[str, np.ndarray]] = {}
        extras: dict[str, np.ndarray] = {}
        for key, a in arrays.items():
            kind, name = split_key(key)
            if kind == "extra":
                extras[name] = np.asarray(a)
            elif kind == "residual":
                raise ValueError(f"{self.label}: client {client_id} uploaded a residual ({key!r})")
            else:
                parts.setdefault(name, {})[kind[-1]] = np.asarray(a)
        sent = self.payload_for(state, client_id).factors
        factors = {}
        for m, p in parts.items():
            for part in PARTS:
                if part not in p:
                    if m not in sent:
                        raise ValueError(
                            f"{self.label}: client {client_id} did not upload {part} of {m!r} "
                            f"and the server never sent it"
                        )
                    p[part] = getattr(sent[m], part)
            scaling = (scalings or {}).get(m, sent[m].scaling if m in sent else None)
            if scaling is None:
                raise ValueError(f"{self.label}: no scaling for module {m!r} from client {client_id}")
            factors[m] = LoRAFactors(p["A"], p["B"], scaling)
        return ClientUpdate(client_id, factors, num_examples, extras, dict(metrics or {}))
