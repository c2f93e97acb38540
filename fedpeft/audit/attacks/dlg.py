"""DLG (Zhu et al. 2019) with iDLG labels (Zhao et al. 2020) on the PEFT payload of an image model.

Minimises the squared L2 distance between the gradient of candidate images
and the observed payload gradient (trainable tensors only) with L-BFGS. The
observation must be on the gradient's scale: a multi-step update divided by
``lr * steps``. Labels come from the head's bias gradient
(:func:`~fedpeft.audit.attacks.gradient_matching.recover_labels`).
"""

from __future__ import annotations

import time
from typing import Mapping

import torch
from torch import nn

from fedpeft.audit.attacks.gradient_matching import (
    ImageMatching,
    as_tensors,
    image_loss,
    l2_distance,
    payload_gradients,
)
from fedpeft.audit.attacks.registry import register_attack


def deep_leakage(model: nn.Module, observed: Mapping[str, object], labels, shape: tuple[int, ...], *,
                 iterations: int = 20, restarts: int = 1, seed: int = 0,
                 bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, dict[str, float]]:
    """DLG with known (recovered) labels: L-BFGS on the squared L2 gradient distance.

    ``observed`` must be on the gradient's scale (a multi-step update divided
    by ``lr * steps``). ``iterations`` counts L-BFGS outer steps (each up to
    20 function evaluations). Returns ``(images, diagnostics)`` like
    :func:`invert_gradients`; the result is clamped to ``bounds``.
    """
    start = time.perf_counter()
    target = as_tensors(observed)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    loss_of = image_loss(model, labels)
    # The payload gradient is small; normalising by its size keeps L-BFGS's
    # line search in a sane range without changing the minimiser.
    scale = 1.0 / (float(sum(t.pow(2).sum() for t in target.values())) + 1e-30)
    gen = torch.Generator().manual_seed(seed)
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        x = torch.rand((len(labels), *shape), generator=gen).mul_(bounds[1] - bounds[0]).add_(bounds[0])
        x.requires_grad_(True)
        opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            g = payload_gradients(model, loss_of(x), create_graph=True)
            d = scale * l2_distance(g, target)
            (x.grad,) = torch.autograd.grad(d, [x])
            return d

        for _ in range(iterations):
            d = opt.step(closure)
            if not torch.isfinite(d):
                break
        with torch.no_grad():
            x.clamp_(*bounds)
        g = payload_gradients(model, loss_of(x), create_graph=False)
        final = float(scale * l2_distance(g, target))
        if final < best_loss or best is None:
            best, best_loss = x.detach().clone(), final
    return best, {"match_loss": best_loss, "seconds": time.perf_counter() - start}


@register_attack("dlg")
class DeepLeakage(ImageMatching):
    """Registered wrapper of :func:`deep_leakage` (parameters: its keyword arguments)."""

    summary = "DLG: L2 gradient matching with L-BFGS, labels from the head bias"
    _function = staticmethod(deep_leakage)
    _defaults = {"iterations": 20, "restarts": 1, "seed": 0}
