"""The data a strategy works on: LoRA factors, client updates, server state.

Everything here is numpy only. Arrays are treated as immutable values: a
strategy never writes into an array it was given, and callers should not write
into arrays they get back (copy first).

Shapes follow peft: for a module ``y = W0 x + s B A x``, ``A`` is
``(r, d_in)``, ``B`` is ``(d_out, r)`` and ``s`` is the scaling
(``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["LoRAFactors", "ClientUpdate", "ServerState", "Payload", "flat_key", "split_key", "NEW_CLIENT"]

STATE_JSON = "state.json"
STATE_ARRAYS = "state.safetensors"
FORMAT = "fedpeft.strategies.ServerState"
FORMAT_VERSION = 1

# Key of ``ServerState.client_factors`` for clients the strategy keeps nothing
# for yet (e.g. a personalised rule's starting point for a newcomer).
NEW_CLIENT = "*"

# Flat wire/checkpoint keys: "<kind>/<name>", kind one of these.
KINDS = ("lora_A", "lora_B", "residual", "extra")


def flat_key(kind: str, name: str) -> str:
    """Key of one array in a flat ``{key: array}`` dict (wire format)."""
    if kind not in KINDS:
        raise ValueError(f"unknown array kind {kind!r}; valid: {', '.join(KINDS)}")
    return f"{kind}/{name}"


def split_key(key: str) -> tuple[str, str]:
    """Inverse of :func:`flat_key`."""
    kind, sep, name = key.partition("/")
    if not sep or kind not in KINDS:
        raise ValueError(
            f"bad array key {key!r}: expected '<kind>/<name>' with kind one of {', '.join(KINDS)}"
        )
    return kind, name


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


@dataclass(eq=False)
class LoRAFactors:
    """The two low-rank factors of one adapted module.

    Parameters
    ----------
    A : np.ndarray
        Down-projection, shape ``(r, d_in)``.
    B : np.ndarray
        Up-projection, shape ``(d_out, r)``.
    scaling : float
        ``s`` in ``delta = s * B @ A``.
    """

    A: np.ndarray
    B: np.ndarray
    scaling: float = 1.0

    def __post_init__(self) -> None:
        self.A = np.asarray(self.A)
        self.B = np.asarray(self.B)
        self.scaling = float(self.scaling)
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"LoRA factors must be 2-D, got A {self.A.shape} and B {self.B.shape}"
            )
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"rank mismatch: A is {self.A.shape} (r, d_in) but B is {self.B.shape} (d_out, r)"
            )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight this adapter changes."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.A.nbytes + self.B.nbytes)

    def delta(self, dtype: Any = None) -> np.ndarray:
        """``scaling * B @ A``, shape ``(d_out, d_in)``, computed in ``dtype``
        (default: the factors' own dtype)."""
        if dtype is None:
            dtype = np.result_type(self.A, self.B)
        return (self.scaling * (self.B.astype(dtype, copy=False) @ self.A.astype(dtype, copy=False))).astype(
            dtype, copy=False
        )

    def copy(self) -> "LoRAFactors":
        return LoRAFactors(self.A.copy(), self.B.copy(), self.scaling)


@dataclass(eq=False)
class ClientUpdate:
    """What one client returns after local training (as the server sees it).

    Parameters
    ----------
    client_id : str
        Stable id of the client (converted to ``str``).
    factors : dict[str, LoRAFactors]
        The client's factors after training, per module. Ranks may differ
        between clients.
    num_examples : int
        Number of local training examples; the default weight is
        ``p_i = n_i / sum(n)``.
    extras : dict[str, np.ndarray]
        Other trainable tensors (e.g. a classifier head).
    metrics : dict
        Scalars the client reports (loss, ...); not aggregated here.
    """

    client_id: str
    factors: dict[str, LoRAFactors]
    num_examples: int
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.client_id = str(self.client_id)
        if int(self.num_examples) != self.num_examples or self.num_examples < 0:
            raise ValueError(
                f"client {self.client_id}: num_examples must be a non-negative integer, "
                f"got {self.num_examples!r}"
            )
        self.num_examples = int(self.num_examples)

    @property
    def nbytes(self) -> int:
        """Size of all factors and extras (not what is uploaded: see
        :meth:`strategies.Strategy.upload_nbytes`)."""
        return sum(f.nbytes for f in self.factors.values()) + _nbytes(self.extras)


@dataclass(eq=False)
class Payload:
    """What the server sends one client for the next round.

    ``residuals`` are absolute: the dense change the client adds to its frozen
    base weight (not an increment since the last round), so a client that
    missed rounds, or a fresh process, needs no memory of its own.
    """

    factors: dict[str, LoRAFactors] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of every array sent (scalings are a few bytes of metadata and
        are not counted)."""
        return _nbytes(self.arrays())

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat ``{"lora_A/<module>": A, "lora_B/<module>": B,
        "residual/<module>": R, "extra/<name>": X}`` dict, e.g. for a Flower
        ``ArrayRecord``."""
        out: dict[str, np.ndarray] = {}
        for m, f in self.factors.items():
            out[flat_key("lora_A", m)] = f.A
            out[flat_key("lora_B", m)] = f.B
        for m, r in self.residuals.items():
            out[flat_key("residual", m)] = r
        for n, x in self.extras.items():
            out[flat_key("extra", n)] = x
        return out

    def scalings(self) -> dict[str, float]:
        return {m: f.scaling for m, f in self.factors.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], scalings: Mapping[str, float]) -> "Payload":
        """Inverse of :meth:`arrays` (plus :meth:`scalings`)."""
        parts: dict[str, dict[str, np.ndarray]] = {}
        residuals: dict[str, np.ndarray] = {}
        extras: dict[str, np.ndarray] = {}
        for key, a in arrays.items():
            kind, name = split_key(key)
            if kind == "residual":
                residuals[name] = np.asarray(a)
            elif kind == "extra":
                extras[name] = np.asarray(a)
            else:
                parts.setdefault(name, {})[kind[-1]] = np.asarray(a)
        factors = {}
        for m, p in parts.items():
            if set(p) != {"A", "B"}:
                raise ValueError(f"payload for module {m!r} lacks lora_A or lora_B")
            factors[m] = LoRAFactors(p["A"], p["B"], scalings[m])
        return cls(factors, residuals, extras)


@dataclass(eq=False)
class ServerState:
    """Everything the server keeps between rounds.

    Parameters
    ----------
    factors : dict[str, LoRAFactors]
        Global factors per module.
    residuals : dict[str, np.ndarray]
        Dense ``(d_out, d_in)`` changes folded into the frozen base weight
        (FedEx-LoRA residuals, FLoRA merges). Absent means zero.
    extras : dict[str, np.ndarray]
        Global values of the other trainable tensors (classifier head).
    client_factors : dict[str, dict[str, LoRAFactors]]
        Per-client factors a strategy keeps (personalised parts, per-rank
        truncations). They replace the global factors of that module for that
        client in :meth:`effective_delta` and in the default payload. The
        entry ``NEW_CLIENT`` (``"*"``), if present, is used for clients that
        have no entry of their own.
    round : int
        Number of aggregations done so far.
    meta : dict
        JSON-serialisable strategy bookkeeping (client ranks, ...). Use lists,
        not tuples, so a checkpoint round-trips exactly.
    """

    factors: dict[str, LoRAFactors] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    client_factors: dict[str, dict[str, LoRAFactors]] = field(default_factory=dict)
    round: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    # -- views ---------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Sorted names of all adapted modules (global factors or residuals)."""
        return sorted(set(self.factors) | set(self.residuals))

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(d_out, d_in)`` of a module."""
        if module in self.factors:
            return self.factors[module].shape
        if module in self.residuals:
            return tuple(self.residuals[module].shape)  # type: ignore[return-value]
        raise KeyError(f"unknown module {module!r}; modules: {', '.join(self.modules) or '(none)'}")

    def factors_for(self, module: str, client_id: str | None = None) -> LoRAFactors | None:
        """The factors a client uses for ``module``: its own kept ones if the
        strategy keeps any, else the global ones (``None`` if neither)."""
        if client_id is not None:
            own = self.client_factors.get(str(client_id), {})
            if module in own:
                return own[module]
            new = self.client_factors.get(NEW_CLIENT, {})
            if module in new:
                return new[module]
        return self.factors.get(module)

    def effective_delta(self, module: str, client_id: str | None = None, dtype: Any = None) -> np.ndarray:
        """The weight change a client model uses:
        ``residual + scaling * B @ A``, shape ``(d_out, d_in)``.

        With ``client_id``, that client's kept factors are used where the
        strategy keeps any; otherwise the global ones.
        """
        self.module_shape(module)  # raises a clear KeyError for unknown modules
        f = self.factors_for(module, client_id)
        r = self.residuals.get(module)
        if dtype is None:
            parts = ([f.A, f.B] if f is not None else []) + ([r] if r is not None else [])
            dtype = np.result_type(*parts)
        delta = f.delta(dtype) if f is not None else np.zeros(self.module_shape(module), dtype)
        if r is not None:
            delta = delta + r.astype(dtype, copy=False)
        return delta

    @property
    def nbytes(self) -> int:
        return (
            sum(f.nbytes for f in self.factors.values())
            + _nbytes(self.residuals)
            + _nbytes(self.extras)
            + sum(f.nbytes for c in self.client_factors.values() for f in c.values())
        )

    def replace(self, **changes: Any) -> "ServerState":
        """A shallow copy with some fields replaced (``dataclasses.replace``)."""
        return replace(self, **changes)

    def copy(self) -> "ServerState":
        """A deep copy (arrays included)."""
        return ServerState(
            factors={m: f.copy() for m, f in self.factors.items()},
            residuals={m: r.copy() for m, r in self.residuals.items()},
            extras={n: x.copy() for n, x in self.extras.items()},
            client_factors={c: {m: f.copy() for m, f in d.items()} for c, d in self.client_factors.items()},
            round=self.round,
            meta=json.loads(json.dumps(self.meta)),
        )

    # -- checkpoint ----------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``state.safetensors`` (arrays) and ``state.json`` (structure,
        scalings, round, meta) into ``directory``. No pickle.

        The JSON is written last and atomically, so it marks a complete
        checkpoint.
        """
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        stored: dict[int, str] = {}  # id -> key: an array shared by several entries is written once

        def put(a: np.ndarray, label: str) -> str:
            if id(a) in stored:
                return stored[id(a)]
            key = stored[id(a)] = f"{len(arrays)}:{label}"  # numbered: unique whatever the names
            # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
            arrays[key] = a if a.flags.c_contiguous else a.copy(order="C")
            return key

        def put_factors(fs: Mapping[str, LoRAFactors], prefix: str) -> dict:
            return {
                m: {"A": put(f.A, f"{prefix}{m}/A"), "B": put(f.B, f"{prefix}{m}/B"), "scaling": f.scaling}
                for m, f in fs.items()
            }

        index = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "round": int(self.round),
            "meta": self.meta,
            "factors": put_factors(self.factors, "factors/"),
            "residuals": {m: put(r, f"residuals/{m}") for m, r in self.residuals.items()},
            "extras": {n: put(x, f"extras/{n}") for n, x in self.extras.items()},
            "client_factors": {
                c: put_factors(fs, f"client_factors/{c}/") for c, fs in self.client_factors.items()
            },
        }
        text = json.dumps(index, indent=1, sort_keys=True)
        tmp_arrays, tmp_json = d / (STATE_ARRAYS + ".tmp"), d / (STATE_JSON + ".tmp")
        save_file(arrays, str(tmp_arrays))
        tmp_json.write_text(text)
        os.replace(tmp_arrays, d / STATE_ARRAYS)
        os.replace(tmp_json, d / STATE_JSON)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ServerState":
        """Read a state written by :meth:`save`."""
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / STATE_JSON).is_file():
            raise FileNotFoundError(f"no {STATE_JSON} in {d}: not a strategy checkpoint")
        index = json.loads((d / STATE_JSON).read_text())
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{d / STATE_JSON}: unsupported format {index.get('format')!r} "
                f"version {index.get('version')!r} (expected {FORMAT} {FORMAT_VERSION})"
            )
        arrays = load_file(str(d / STATE_ARRAYS))

        def get_factors(spec: Mapping) -> dict[str, LoRAFactors]:
            return {m: LoRAFactors(arrays[s["A"]], arrays[s["B"]], s["scaling"]) for m, s in spec.items()}

        return cls(
            factors=get_factors(index["factors"]),
            residuals={m: arrays[k] for m, k in index["residuals"].items()},
            extras={n: arrays[k] for n, k in index["extras"].items()},
            client_factors={c: get_factors(s) for c, s in index["client_factors"].items()},
            round=int(index["round"]),
            meta=index["meta"],
        )
