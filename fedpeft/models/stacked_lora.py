"""K clients' LoRA adapters applied at once to one resident frozen base model.

A batched round concatenates K clients' micro-batches (the same number of
rows each, the same padded length) into one batch of ``K * B`` rows. Inside
:meth:`StackedLoRA.applied`, each LoRA layer of the resident peft model
computes its frozen base output once for all rows and adds each client's own
low-rank term with batched matmuls over the client blocks::

    y[k] = base(x[k]) + scaling[k] * (x[k] @ A[k].T) @ B[k].T  (+ x[k] @ R[k].T)

where ``x[k]`` is client k's block reshaped to ``(B * T, in)``. The trained
head (peft's ``modules_to_save``) is per client in the same way. Every
client's tensors are separate leaves, so each client gets its own optimizer
with exactly the state a client trained alone would have, and a client that
skips a step (an empty Poisson draw) simply does not step its optimizer.

Nothing here mixes rows of different clients: the base model is frozen and
applies row by row (attention stays within a sequence), so the gradient of
``sum_k loss_k`` with respect to client k's leaves is the gradient of
``loss_k`` alone.

Under sample-level DP, :meth:`StackedLoRA.applied` takes a
:class:`~fedpeft.privacy.stacked_dp.StackedGradSamples`: the stacked layers
and heads then also record each example's own gradient of every client
tensor during the backward pass, for per-client clipping and noise
(:mod:`fedpeft.privacy.stacked_dp`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper

from fedpeft.models.lora import PREFIX
from fedpeft.models.resident import ResidentModel
from strategies import LoRAFactors, Payload

if TYPE_CHECKING:  # the DP layer above fills these in; the stacked layers only hand it their tensors
    from fedpeft.privacy.stacked_dp import Key, StackedGradSamples


@dataclass
class ClientAdapter:
    """One client's trainable tensors, as leaves of their own.

    ``A`` and ``B`` are padded to the resident model's rank, as
    :meth:`ResidentModel.set_payload` pads them (the padding gets zero
    gradients; :meth:`rank_padding` is what the client's optimizer keeps at
    zero when DP noise lands on it); ``ranks`` remembers the client's own rank
    per module. ``head`` maps each ``modules_to_save`` module (without peft's
    prefix) to its parameters by name.
    """

    A: dict[str, torch.Tensor]
    B: dict[str, torch.Tensor]
    scalings: dict[str, float]
    ranks: dict[str, int]
    head: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)

    def parameters(self) -> list[torch.Tensor]:
        """The tensors this client trains (those that require gradients), for its optimizer."""
        tensors = [*self.A.values(), *self.B.values(), *(p for params in self.head.values() for p in params.values())]
        return [t for t in tensors if t.requires_grad]

    def rank_padding(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """``(A, B, rank)`` of every module this client trains below the resident model's rank."""
        return [(self.A[m], self.B[m], r) for m, r in self.ranks.items() if r < self.A[m].shape[0]]

    def tensor(self, key: Key) -> torch.Tensor:
        """The tensor of ``key``: ``("A", module)``, ``("B", module)`` or ``("head", head_module, parameter)``."""
        if key[0] == "head":
            return self.head[key[1]][key[2]]
        return (self.A if key[0] == "A" else self.B)[key[1]]

    def payload(self) -> Payload:
        """The client's current factors (at its own rank) and head: the shape of :meth:`ResidentModel.payload`."""
        factors = {
            m: LoRAFactors(A=_array(self.A[m][: self.ranks[m]]), B=_array(self.B[m][:, : self.ranks[m]]),
                           scaling=self.scalings[m])
            for m in self.A
        }
        extras = {f"{module}.{name}": _array(p) for module, params in self.head.items()
                  for name, p in params.items()}
        return Payload(factors=factors, extras=extras)


def _leaf(p: torch.Tensor) -> torch.Tensor:
    """A client's own copy of a model tensor, trainable where the model's is."""
    return p.detach().clone().requires_grad_(p.requires_grad)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy()


class StackedLoRA:
    """The adapters of K clients over one :class:`ResidentModel`.

    Parameters
    ----------
    resident : ResidentModel
        The process's resident model. Its own adapter tensors end up holding
        the last client's received payload and its base weights the residual
        :meth:`applied` used: load a payload before using it alone again
        (every client handler does).
    payloads : sequence of Payload
        What each client received, in client-block order.
    trainable : callable, optional
        A strategy's ``trainable(module) -> {"A": bool, "B": bool}``.
    """

    def __init__(self, resident: ResidentModel, payloads: Sequence[Payload],
                 trainable: Callable[[str], dict[str, bool]] | None = None):
        if not payloads:
            raise ValueError("StackedLoRA needs at least one client payload")
        self.resident = resident
        self.modules = list(resident.scalings)
        self.head_modules = [name.removeprefix(PREFIX) for name, m in resident.model.named_modules()
                             if isinstance(m, ModulesToSaveWrapper)]
        # Each client's payload goes through the resident model's own loader
        # (rank padding, scalings, trainable parts), then is copied out as leaves.
        self.clients = [self._capture(p, trainable) for p in payloads]
        self.grad_samples: StackedGradSamples | None = None

    def __len__(self) -> int:
        return len(self.clients)

    def _capture(self, payload: Payload, trainable) -> ClientAdapter:
        self.resident.set_payload(payload, trainable=trainable)
        A, B = {}, {}
        for m in self.modules:
            layer = self._layer(m)
            A[m], B[m] = _leaf(layer.lora_A["default"].weight), _leaf(layer.lora_B["default"].weight)
        head = {name: {n: _leaf(p) for n, p in self._head(name).named_parameters()} for name in self.head_modules}
        return ClientAdapter(A=A, B=B, scalings=dict(self.resident.scalings), ranks=dict(self.resident.ranks),
                             head=head, residuals=dict(payload.residuals))

    def _layer(self, module: str):
        return self.resident.model.get_submodule(PREFIX + module)

    def trained_keys(self) -> list[Key]:
        """The keys of the tensors each client trains, in the order the resident model lists its parameters.

        The sequential DP-SGD client clips over and draws noise for its
        trainable parameters in that order (``DPOptimizer`` over
        ``model.parameters()``), so the batched one does too.

        Raises
        ------
        ValueError
            If the resident model trains a tensor that is no client's A, B or
            head parameter (the batched pass would not train it), or the
            clients train different tensors.
        """
        names = {}
        for m in self.modules:
            names[f"{PREFIX}{m}.lora_A.default.weight"] = ("A", m)
            names[f"{PREFIX}{m}.lora_B.default.weight"] = ("B", m)
        for head in self.head_modules:
            for pname, _ in self._head(head).named_parameters():
                names[f"{PREFIX}{head}.modules_to_save.default.{pname}"] = ("head", head, pname)
        keys, uncovered = [], []
        for name, p in self.resident.model.named_parameters():
            if name in names:
                keys.append(names[name])
            elif p.requires_grad:
                uncovered.append(name)
        if uncovered:
            raise ValueError(f"the batched pass trains LoRA factors and modules_to_save heads only; the model also "
                             f"trains {uncovered[0]}")
        trained = [key for key in keys if self.clients[0].tensor(key).requires_grad]
        if any([key for key in keys if c.tensor(key).requires_grad] != trained for c in self.clients[1:]):
            raise ValueError("batched clients must train the same tensors")
        return trained

    def _head(self, module: str) -> torch.nn.Module:
        return self.resident.model.get_submodule(PREFIX + module).modules_to_save["default"]

    def _shared_residuals(self) -> dict[str, np.ndarray] | None:
        """The residuals, if every client has the same ones (then they fold into the base once), else None."""
        first = self.clients[0].residuals
        for c in self.clients[1:]:
            if set(c.residuals) != set(first) or any(not np.array_equal(c.residuals[m], first[m]) for m in first):
                return None
        return first

    @contextmanager
    def applied(self, grad_samples: StackedGradSamples | None = None) -> Iterator[None]:
        """Within this block the resident model runs the K clients' adapters on K stacked client blocks.

        The input's leading dimension must be ``K * B``, client k's rows at
        ``k * B : (k + 1) * B``. LoRA dropout is the layer's own module, as
        peft applies it (on the input of the low-rank term only); batched
        training gives it per-client streams
        (:class:`fedpeft.training.client_dropout.ClientDropout`). With
        ``grad_samples``, every backward pass through the block also records
        each row's own gradient of every client tensor there.
        """
        self.grad_samples = grad_samples
        shared = self._shared_residuals()
        # W0 (+ R when shared) in the frozen base; per-client residuals become a dense term.
        self.resident.set_residuals(shared if shared is not None else {})
        per_client = None if shared is not None else self._stacked_residuals()
        patched = []
        try:
            for m in self.modules:
                layer = self._layer(m)
                layer.forward = self._lora_forward(m, layer, None if per_client is None else per_client.get(m))
                patched.append(layer)
            for name in self.head_modules:
                wrapper = self.resident.model.get_submodule(PREFIX + name)
                wrapper.forward = self._head_forward(name)
                patched.append(wrapper)
            yield
        finally:
            self.grad_samples = None
            for module in patched:
                del module.forward  # back to the class's forward

    def _stacked_residuals(self) -> dict[str, torch.Tensor]:
        """``module -> (K, out, in)`` residuals, zeros for a client without one."""
        out = {}
        for m in {m for c in self.clients for m in c.residuals}:
            weight = self._layer(m).base_layer.weight
            out[m] = torch.stack([
                torch.as_tensor(np.asarray(c.residuals[m]), dtype=weight.dtype, device=weight.device)
                if m in c.residuals else torch.zeros_like(weight) for c in self.clients
            ])
        return out

    def _lora_forward(self, module: str, layer, residual: torch.Tensor | None):
        k = len(self.clients)
        weight = layer.lora_A["default"].weight
        scaling = torch.tensor([c.scalings[module] for c in self.clients], dtype=weight.dtype,
                               device=weight.device).view(k, 1, 1)

        dropout = layer.lora_dropout["default"]
        train_A, train_B = self.clients[0].A[module].requires_grad, self.clients[0].B[module].requires_grad

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            # As peft's Linear: dropout after the base layer, on the low-rank term's input only.
            dropped = dropout(x).reshape(k, -1, x.shape[-1])  # (K, B*T, in)
            A = torch.stack([c.A[module] for c in self.clients])  # (K, r, in)
            B = torch.stack([c.B[module] for c in self.clients])  # (K, out, r)
            h = torch.bmm(dropped, A.transpose(1, 2))
            delta = torch.bmm(h, B.transpose(1, 2)) * scaling
            if self.grad_samples is not None:
                self.grad_samples.lora(module, delta, dropped, h, B, scaling, x.shape[0] // k, train_A, train_B)
            if residual is not None:  # part of the base weight for a client alone: no dropout
                delta = delta + torch.bmm(x.reshape(k, -1, x.shape[-1]), residual.transpose(1, 2))
            return result + delta.reshape(result.shape)

        return forward

    def _head_forward(self, name: str):
        k = len(self.clients)
        module = self._head(name)
        params = [c.head[name] for c in self.clients]
        if isinstance(module, torch.nn.Linear):
            train = {n: t.requires_grad for n, t in params[0].items()}

            def forward(x: torch.Tensor) -> torch.Tensor:
                blocks = x.reshape(k, -1, x.shape[-1])
                weight = torch.stack([p["weight"] for p in params])  # (K, out, in)
                out = torch.bmm(blocks, weight.transpose(1, 2))
                if module.bias is not None:
                    out = out + torch.stack([p["bias"] for p in params]).unsqueeze(1)
                if self.grad_samples is not None:
                    self.grad_samples.linear_head(name, out, blocks, x.shape[0] // k, params[0]["weight"].dtype, train)
                return out.reshape(*x.shape[:-1], out.shape[-1])
        else:
            # Any other head: its own parameters on each client's rows in turn (heads are small).
            def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                outs = []
                for c, (p, xk) in enumerate(zip(params, x.chunk(k))):
                    outs.append(torch.func.functional_call(module, p, (xk, *args), kwargs))
                    if self.grad_samples is not None:
                        self.grad_samples.module_head(name, c, module, p, outs[-1], xk, args, kwargs)
                return torch.cat(outs)

        return forward
