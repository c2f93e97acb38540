"""The model a process keeps resident: frozen base + LoRA adapter, loaded once.

Each Flower message swaps an adapter payload into this model instead of
building a new one, so a worker pays the model load once per run, not once
per round (DESIGN.md, "Principles"). The model moves to its device once, at
load; payloads stay numpy arrays on the host, converted at the boundary
(:meth:`ResidentModel.set_payload` copies them onto the device,
:meth:`ResidentModel.payload` copies them back).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.models.lora import (
    PREFIX,
    adapter_tensors,
    attach_lora,
    copy_trainable_state,
    load_trainable_state,
    module_scalings,
    to_payload,
    to_peft_state,
    trainable_state,
)
from fedpeft.models.registry import get_model_spec
from strategies import LoRAFactors, Payload


@dataclass
class ResidentModel:
    """A peft model plus what is needed to swap payloads in and out of it."""

    model: object  # peft.PeftModel
    tokenizer: object
    task: str
    scalings: dict[str, float]
    total_params: int

    rank: int = 0
    initial: Payload | None = None  # the seeded initial adapter, before any payload was swapped in
    originals: dict = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    _live: dict = field(default_factory=dict, repr=False)  # the adapter's tensors, found on the first swap
    _layers: dict = field(default_factory=dict, repr=False)  # module -> its LoRA layer (get_submodule walks the tree)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    def set_payload(self, payload: Payload, trainable: Callable[[str], dict[str, bool]] | None = None) -> None:
        """Load a payload into the model.

        Factors of a lower rank than the model's are zero-padded: the padded
        rows of A and columns of B get zero gradients, and a local optimizer
        under :func:`fedpeft.training.loop.keep_rank_padding_zero` keeps them
        zero when DP noise lands on them, so the client trains at exactly its
        own rank. Each module takes the payload's
        scaling. Residuals are added to the frozen base weights. ``trainable``
        (a strategy's ``trainable``) freezes factors that must not train.
        """
        padded = {}
        for module, f in payload.factors.items():
            if f.rank > self.rank:
                raise ValueError(f"{module}: rank {f.rank} exceeds the model's LoRA rank {self.rank}")
            pad = self.rank - f.rank
            padded[module] = f if pad == 0 else LoRAFactors(A=np.pad(f.A, ((0, pad), (0, 0))),
                                                            B=np.pad(f.B, ((0, 0), (0, pad))), scaling=f.scaling)
            self.ranks[module] = f.rank
            self._layer(module).scaling["default"] = float(f.scaling)
            self.scalings[module] = float(f.scaling)
        state = to_peft_state(Payload(factors=padded, extras=payload.extras))
        live = self._adapter_tensors()
        if live is not None:
            copy_trainable_state(live, state)
        else:
            load_trainable_state(self.model, state)
        self.set_residuals(payload.residuals)
        for module in payload.factors:
            parts = trainable(module) if trainable else {"A": True, "B": True}
            layer = self._layer(module)
            layer.lora_A["default"].weight.requires_grad_(bool(parts["A"]))
            layer.lora_B["default"].weight.requires_grad_(bool(parts["B"]))

    def rank_padding(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(A, B, rank)`` of every module the last payload loaded below the model's rank."""
        return [(self._layer(m).lora_A["default"].weight, self._layer(m).lora_B["default"].weight, r)
                for m, r in self.ranks.items() if r < self.rank]

    def _adapter_tensors(self) -> dict | None:
        """The adapter's parameter tensors by peft state-dict key (found once; None: peft's slower load each time)."""
        if "live" not in self._live:
            self._live["live"] = adapter_tensors(self.model)
        return self._live["live"]

    def _layer(self, module: str):
        if module not in self._layers:
            self._layers[module] = self.model.get_submodule(PREFIX + module)
        return self._layers[module]

    def set_residuals(self, residuals) -> None:
        """Make each frozen base weight ``W0 + residuals[module]`` (``W0`` where none is given)."""
        # Residuals are absolute (W = W0 + R), so keep a pristine W0 of every
        # module that ever got one and rebuild from it each time.
        for module in set(self.originals) | set(residuals):
            weight = self._layer(module).base_layer.weight
            if module not in self.originals:
                self.originals[module] = weight.detach().clone()
            new = self.originals[module]
            if module in residuals:
                residual = torch.from_numpy(np.asarray(residuals[module], dtype=np.float32))
                new = new + residual.to(new.device)
            weight.data.copy_(new)

    def payload(self) -> Payload:
        """The adapter's current factors (at the rank last loaded) and extras."""
        full = to_payload(trainable_state(self.model), self.scalings)
        factors = {}
        for module, f in full.factors.items():
            r = self.ranks.get(module, self.rank)
            factors[module] = LoRAFactors(A=f.A[:r].copy(), B=f.B[:, :r].copy(), scaling=f.scaling)
        return Payload(factors=factors, extras=full.extras)

    @property
    def trainable_params(self) -> int:
        """Parameters that currently require gradients."""
        return int(sum(p.numel() for p in self.model.parameters() if p.requires_grad))

    def client_trainable_params(self, trainable: Callable[[str], dict[str, bool]] | None = None) -> int:
        """Values a client at the model's rank trains under a rule's ``trainable``.

        Counted from the parts the rule leaves trainable (FFA-LoRA freezes
        every A), not from the server's copy, whose factors all require grads.
        """
        lora = 0
        for module in self.scalings:
            parts = trainable(module) if trainable else {"A": True, "B": True}
            layer = self._layer(module)
            lora += sum(getattr(layer, f"lora_{part}")["default"].weight.numel() for part in ("A", "B") if parts[part])
        head = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and ".lora_" not in n)
        return int(lora + head)

    def full_model_nbytes(self) -> int:
        """Bytes of every base-model parameter in float32: what full fine-tuning would ship."""
        return 4 * self.total_params


@dataclass(frozen=True)
class ResidentSpec:
    """What a resident model is built from: the base model and its LoRA adapter (hashable: the cache key).

    Parameters
    ----------
    model : str
        ``model.name``: a registered short name or a local model folder.
    task : str
        ``model.task`` ("auto" or "" to infer it from the model).
    num_labels : int
        Classes of the classification head.
    dropout : float
        The base model's dropout.
    pooling : str
        ``model.pooling``.
    rank : int
        LoRA rank of the resident model (the largest client rank).
    alpha : float
        LoRA alpha.
    target_modules : tuple of str
        Modules LoRA adapts (empty: the model's defaults).
    lora_dropout : float
        Dropout on the LoRA input.
    rslora : bool
        Rank-stabilised scaling alpha / sqrt(r).
    modules_to_save : tuple of str
        The head, trained in full (empty: the model's default head).
    seed : int
        Seeds the initial adapter and head.
    device : str
        Where the model lives ("cpu", "cuda:0", ...: a resolved device, see
        :func:`fedpeft.devices.resolve`). The model is built on the CPU from
        the seed, then moved, so its initial state is the same on every device.
    """

    model: str
    task: str
    num_labels: int
    dropout: float
    pooling: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    lora_dropout: float
    rslora: bool
    modules_to_save: tuple[str, ...]
    seed: int
    device: str = "cpu"


_CACHE: dict[ResidentSpec, ResidentModel] = {}
_LOCK = threading.Lock()


def resident_model(spec: ResidentSpec) -> ResidentModel:
    """This process's model for ``spec``, loaded on first use and then reused."""
    with _LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = load_resident_model(spec)
        return _CACHE[spec]


def load_resident_model(spec: ResidentSpec) -> ResidentModel:
    """Build a new model for ``spec`` (uncached; :func:`resident_model` keeps one per process)."""
    model_spec = get_model_spec(spec.model, spec.task)
    # The new task head is initialised from torch's global RNG: seed it so the
    # server's initial state, which every client receives, is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        pooling = {"pooling": spec.pooling} if spec.pooling != "cls" else {}
        base, tokenizer = model_spec.load(num_labels=spec.num_labels, dropout=spec.dropout, **pooling)
    total = int(sum(p.numel() for p in base.parameters()))
    model = attach_lora(
        base,
        model_spec.task,
        r=spec.rank,
        alpha=spec.alpha,
        target_modules=list(spec.target_modules or model_spec.default_targets),
        dropout=spec.lora_dropout,
        rslora=spec.rslora,
        seed=spec.seed,
        head_modules=tuple(spec.modules_to_save) or model_spec.head_modules,
    )
    model.to(torch.device(spec.device))
    resident = ResidentModel(
        model=model, tokenizer=tokenizer, task=model_spec.task, scalings=module_scalings(model), total_params=total,
        rank=spec.rank,
    )
    resident.initial = resident.payload()
    return resident


def frozen_fingerprint(model) -> dict[str, np.ndarray]:
    """Copies of every frozen parameter, to prove training never touched them."""
    return {n: p.detach().cpu().numpy().copy() for n, p in model.named_parameters() if not p.requires_grad}

