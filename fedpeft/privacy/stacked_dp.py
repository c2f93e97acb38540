"""Sample-level DP-SGD for K clients trained together over one resident base (the batched engine).

The batched pass (:func:`fedpeft.training.batched.train_clients_batched`)
stacks the K clients' micro-batches along the batch dimension and applies
each client's LoRA factors and head to its own block
(:class:`fedpeft.models.stacked_lora.StackedLoRA`). Under ``dp.mode =
"sample"`` each client must get exactly the DP-SGD step it would take alone
with opacus (:mod:`fedpeft.privacy.dp_sgd`): its own per-example gradients,
clipped together, summed, noised from its own secret generator and divided
by the configured batch size.

opacus's hooks cannot be used here: they expect one parameter per layer,
while a stacked layer holds K clients' leaves. The per-example gradients are
written out by hand instead, from what the stacked forward already computes.
For a LoRA layer with (dropped-out) input ``x``, low-rank activation
``h = x A_k^T`` and output gradient ``g`` (scaled by the layer's scaling, as
peft scales after ``lora_B``), example ``i`` of client ``k`` has::

    grad B_k[i] = sum_t g[i, t] h[i, t]^T         grad A_k[i] = sum_t (g[i, t] B_k) x[i, t]^T

summed over the example's tokens; a linear head likewise, and any other head
through ``torch.func`` (``vmap`` over the examples of ``grad``). These are
the same sums opacus's linear grad sampler forms for ``lora_A``, ``lora_B``
and the head on one client's batch. They are computed in the tensors'
dtype (float32), which under bfloat16 autocast is what
:func:`fedpeft.privacy.dp_sgd.grad_samples_to_param_dtype` casts opacus's
per-example gradients to before clipping.

:func:`clip_and_noise` then does for every client what ``DPOptimizer``
does: the flat per-example norm over all of the client's trainable tensors
(in the resident model's parameter order), the clip factor
``min(1, C / (norm + 1e-6))``, the clipped sum, Gaussian noise of std
``sigma C`` drawn tensor by tensor in that same order from the client's own
generator (opacus's own noise function), and the division by the expected
batch size. A client whose Poisson draw is empty has no rows: its sum is
zero and it takes the noise-only step, as :func:`noise_only_step` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Hashable

import torch

from fedpeft.compat.opacus_internals import gaussian_noise
from fedpeft.privacy.dp_sgd import DPSGD

Key = tuple[Hashable, ...]
"""A client tensor's key: ``("A", module)``, ``("B", module)`` or ``("head", head_module, parameter)``."""


class StackedGradSamples:
    """Per-example gradients of K stacked clients' tensors, filled in by one backward pass.

    :class:`~fedpeft.models.stacked_lora.StackedLoRA` registers the hooks
    (:meth:`lora`, :meth:`linear_head`, :meth:`module_head`) during the
    forward pass; each hook adds, for every key, a tensor of shape
    ``(K, rows, *tensor shape)``: the gradient of each row's own loss
    (the backward pass must be of the sum of the per-example losses).
    Rows past a client's real rows are filler and hold zeros. A layer used
    twice in one pass adds up, as opacus accumulates grad samples.
    """

    def __init__(self, clients: int):
        self.clients = clients
        self.grads: dict[Key, torch.Tensor] = {}
        self.rows: int = 0

    def clear(self) -> None:
        self.grads = {}
        self.rows = 0

    def _add(self, key: Key, value: torch.Tensor) -> None:
        self.rows = value.shape[1]
        if key in self.grads:
            self.grads[key] = self.grads[key] + value
        else:
            self.grads[key] = value

    def _add_client(self, key: Key, client: int, value: torch.Tensor) -> None:
        if key not in self.grads:
            self.grads[key] = value.new_zeros((self.clients, *value.shape))
        self.rows = value.shape[0]
        self.grads[key][client] += value

    def lora(self, module: str, out: torch.Tensor, x: torch.Tensor, h: torch.Tensor, B: torch.Tensor,
             scaling: torch.Tensor, rows: int, train_A: bool, train_B: bool) -> None:
        """Record the per-example gradients of one stacked LoRA layer's A and B from its output's gradient.

        ``out = scaling * (x @ A^T) @ B^T`` of shape ``(K, rows * T, out)``,
        ``x`` the (dropped-out) input ``(K, rows * T, in)``, ``h = x @ A^T``
        and ``B`` the stacked ``(K, out, r)``.
        """
        if not out.requires_grad or not (train_A or train_B):
            return
        k = self.clients
        dtype = B.dtype

        def hook(grad: torch.Tensor) -> None:
            g = (grad * scaling).to(dtype)  # the gradient at lora_B's output, (K, rows * T, out)
            g4 = g.reshape(k, rows, -1, g.shape[-1])
            if train_B:
                h4 = h.detach().to(dtype).reshape(k, rows, -1, h.shape[-1])
                self._add(("B", module), torch.einsum("kbto,kbtr->kbor", g4, h4))
            if train_A:
                gh = torch.bmm(g, B.detach().to(dtype))  # the gradient at lora_A's output, (K, rows * T, r)
                x4 = x.detach().to(dtype).reshape(k, rows, -1, x.shape[-1])
                self._add(("A", module), torch.einsum("kbtr,kbti->kbri", gh.reshape(k, rows, -1, gh.shape[-1]), x4))

        out.register_hook(hook)

    def linear_head(self, name: str, out: torch.Tensor, x: torch.Tensor, rows: int, dtype: torch.dtype,
                    train: dict[str, bool]) -> None:
        """Record the per-example gradients of a stacked linear head ``out = x @ W_k^T (+ b_k)``.

        ``out`` is ``(K, rows * T, out)`` and ``x`` ``(K, rows * T, in)``
        (``T = 1`` for a head on pooled features).
        """
        if not out.requires_grad or not any(train.values()):
            return
        k = self.clients

        def hook(grad: torch.Tensor) -> None:
            g = grad.to(dtype).reshape(k, rows, -1, grad.shape[-1])
            if train.get("weight"):
                xs = x.detach().to(dtype).reshape(k, rows, -1, x.shape[-1])
                self._add(("head", name, "weight"), torch.einsum("kbto,kbti->kboi", g, xs))
            if train.get("bias"):
                self._add(("head", name, "bias"), g.sum(2))

        out.register_hook(hook)

    def module_head(self, name: str, client: int, module: torch.nn.Module, params: dict[str, torch.Tensor],
                    out: torch.Tensor, x: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """Record the per-example gradients of any other head, on client ``client``'s rows ``x`` (``torch.func``)."""
        trained = {n: p for n, p in params.items() if p.requires_grad}
        if not out.requires_grad or not trained:
            return
        fixed = {n: p.detach() for n, p in params.items() if not p.requires_grad}
        dtype = next(iter(trained.values())).dtype

        def contribution(p: dict[str, torch.Tensor], xi: torch.Tensor, gi: torch.Tensor) -> torch.Tensor:
            y = torch.func.functional_call(module, {**fixed, **p}, (xi.unsqueeze(0), *args), kwargs)
            return (y * gi.unsqueeze(0)).sum()

        def hook(grad: torch.Tensor) -> None:
            per_example = torch.func.vmap(torch.func.grad(contribution), in_dims=(None, 0, 0))(
                {n: p.detach() for n, p in trained.items()}, x.detach().to(dtype), grad.to(dtype))
            for n, value in per_example.items():
                self._add_client(("head", name, n), client, value)

        out.register_hook(hook)


def clip_and_noise(samples: StackedGradSamples, keys: Sequence[Key], tensors: Sequence[Callable[[Key], torch.Tensor]],
                   sizes: Sequence[int], mechanisms: Sequence[DPSGD], generators: Sequence[torch.Generator],
                   expected_batch_size: float) -> None:
    """Set each client's trainable tensors' ``.grad`` to its DP-SGD gradient, as ``DPOptimizer`` forms it alone.

    Parameters
    ----------
    samples : StackedGradSamples
        This step's per-example gradients (empty when no client drew a row).
    keys : sequence of Key
        Every client's trainable tensors, in the order the resident model
        lists its parameters: the order opacus clips and draws noise in.
    tensors : sequence of callables
        Client k's tensor of a key (``tensors[k](key)``).
    sizes : sequence of int
        Each client's real rows this step (0: an empty Poisson draw).
    mechanisms : sequence of DPSGD
        Each client's sigma and clipping norm.
    generators : sequence of torch.Generator
        Each client's own secret noise generator.
    expected_batch_size : float
        What opacus divides by for ``loss_reduction = "mean"`` (the
        configured batch size, as the sequential client passes it).
    """
    k = samples.clients
    rows = samples.rows
    refs = [tensors[0](key) for key in keys]
    grads: list[torch.Tensor | None] = [samples.grads.get(key) for key in keys]
    if rows and any(g is not None for g in grads):
        norms = torch.stack([g.reshape(k, rows, -1).norm(2, dim=-1) if g is not None
                             else refs[0].new_zeros((k, rows)) for g in grads], dim=-1).norm(2, dim=-1)  # (K, rows)
        factor = torch.zeros_like(norms)
        for c, (n, mechanism) in enumerate(zip(sizes, mechanisms)):
            if n:
                factor[c, :n] = (mechanism.max_grad_norm / (norms[c, :n] + 1e-6)).clamp(max=1.0)
        summed = [torch.einsum("kb,kb...->k...", factor.to(ref.dtype), g.to(ref.dtype)) if g is not None
                  else ref.new_zeros((k, *ref.shape)) for g, ref in zip(grads, refs)]
    else:  # no client drew a row: every client takes the noise-only step
        summed = [ref.new_zeros((k, *ref.shape)) for ref in refs]
    for c in range(k):
        std = mechanisms[c].noise_multiplier * mechanisms[c].max_grad_norm
        for key, total in zip(keys, summed):
            p = tensors[c](key)
            noise = gaussian_noise(std, total[c], generators[c])
            p.grad = (total[c] + noise).view_as(p) / expected_batch_size
