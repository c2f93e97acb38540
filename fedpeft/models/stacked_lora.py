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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from peft.utils import ModulesToSaveWrapper

from fedpeft.models.lora import PREFIX
from fedpeft.models.resident import ResidentModel
from strategies import LoRAFactors, Payload


@dataclass
class ClientAdapter:
    """One client's trainable tensors, as leaves of their own.

    ``A`` and ``B`` are padded to the resident model's rank, as
    :meth:`ResidentModel.set_payload` pads them (the padding gets zero
    gradients and stays zero); ``ranks`` remembers the client's own rank per
    module. ``head`` maps each ``modules_to_save`` module (without peft's
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
    def applied(self) -> Iterator[None]:
        """Within this block the resident model runs the K clients' adapters on K stacked client blocks.

        The input's leading dimension must be ``K * B``, client k's rows at
        ``k * B : (k + 1) * B``. LoRA dropout is the layer's own module, as
        peft applies it (on the input of the low-rank term only); batched
        training gives it per-client streams
        (:class:`fedpeft.training.client_dropout.ClientDropout`).
        """
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

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            # As peft's Linear: dropout after the base layer, on the low-rank term's input only.
            dropped = dropout(x).reshape(k, -1, x.shape[-1])  # (K, B*T, in)
            A = torch.stack([c.A[module] for c in self.clients])  # (K, r, in)
            B = torch.stack([c.B[module] for c in self.clients])  # (K, out, r)
            delta = torch.bmm(torch.bmm(dropped, A.transpose(1, 2)), B.transpose(1, 2)) * scaling
            if residual is not None:  # part of the base weight for a client alone: no dropout
                delta = delta + torch.bmm(x.reshape(k, -1, x.shape[-1]), residual.transpose(1, 2))
            return result + delta.reshape(result.shape)

        return forward

    def _head_forward(self, name: str):
        k = len(self.clients)
        module = self._head(name)
        params = [c.head[name] for c in self.clients]
        if isinstance(module, torch.nn.Linear):
            def forward(x: torch.Tensor) -> torch.Tensor:
                blocks = x.reshape(k, -1, x.shape[-1])
                weight = torch.stack([p["weight"] for p in params])  # (K, out, in)
                out = torch.bmm(blocks, weight.transpose(1, 2))
                if module.bias is not None:
                    out = out + torch.stack([p["bias"] for p in params]).unsqueeze(1)
                return out.reshape(*x.shape[:-1], out.shape[-1])
        else:
            # Any other head: its own parameters on each client's rows in turn (heads are small).
            def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
                outs = [torch.func.functional_call(module, p, (xk, *args), kwargs) for p, xk in zip(params, x.chunk(k))]
                return torch.cat(outs)

        return forward
