"""Inverting Gradients (Geiping et al. 2020) on the PEFT payload of an image model.

Minimises ``1 - cos(g(x'), g_obs) + lambda * TV(x')`` over candidate images
``x'``, where ``g`` is the gradient of the trainable tensors only (LoRA
factors and head): Adam on signed gradients with step decay, pixels boxed to
[0, 1], several random restarts; the restart with the lowest matching loss
wins (the attacker cannot compare with the truth). The cosine ignores the
scale, so a multi-step update works as is. Labels come from the head's bias
gradient (:func:`~fedpeft.audit.attacks.gradient_matching.recover_labels`).
"""

from __future__ import annotations

import time
from typing import Mapping

import torch
from torch import nn

from fedpeft.audit.attacks.gradient_matching import (
    ImageMatching,
    as_tensors,
    cosine_distance,
    image_loss,
    payload_gradients,
    total_variation,
)
from fedpeft.audit.attacks.registry import register_attack


def invert_gradients(model: nn.Module, observed: Mapping[str, object], labels, shape: tuple[int, ...], *,
                     iterations: int = 1000, lr: float = 0.1, tv: float = 1e-4, restarts: int = 1, seed: int = 0,
                     bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, dict[str, float]]:
    """Inverting Gradients: find images whose payload gradient points where the observed one does.

    Parameters
    ----------
    model : torch.nn.Module
        The peft model with the global state the server sent (eval mode).
    observed : mapping of str to array
        Observed payload gradient (or update read as a scaled gradient), by wire key.
    labels : sequence of int
        The batch's labels (from :func:`recover_labels`).
    shape : tuple of int
        ``(C, H, W)`` of one image.
    iterations, lr, tv, restarts, seed
        Adam steps per restart, its step size, the TV weight, the number of
        random starts, and their seed.
    bounds : (float, float)
        Pixel range; the iterate is clamped to it after every step.

    Returns
    -------
    (torch.Tensor, dict)
        ``(B, C, H, W)`` reconstructions and diagnostics (``match_loss`` of the
        chosen restart, ``seconds``).
    """
    start = time.perf_counter()
    target = as_tensors(observed)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    loss_of = image_loss(model, labels)
    gen = torch.Generator().manual_seed(seed)
    best, best_loss = None, float("inf")
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    for _ in range(restarts):
        x = torch.rand((len(labels), *shape), generator=gen).mul_(bounds[1] - bounds[0]).add_(bounds[0])
        x.requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for _ in range(iterations):
            opt.zero_grad()
            g = payload_gradients(model, loss_of(x), create_graph=True)
            objective = cosine_distance(g, target) + tv * total_variation(x)
            (grad_x,) = torch.autograd.grad(objective, [x])
            x.grad = grad_x.sign()  # signed gradients, as in Geiping et al.
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        g = payload_gradients(model, loss_of(x), create_graph=False)
        final = float((cosine_distance(g, target) + tv * total_variation(x)).detach())
        if final < best_loss:
            best, best_loss = x.detach().clone(), final
    return best, {"match_loss": best_loss, "seconds": time.perf_counter() - start}


@register_attack("inverting-gradients")
class InvertingGradients(ImageMatching):
    """Registered wrapper of :func:`invert_gradients` (parameters: its keyword arguments)."""

    summary = "Inverting Gradients: cosine gradient matching + TV prior, Adam with restarts"
    _function = staticmethod(invert_gradients)
    _defaults = {"iterations": 1000, "lr": 0.1, "tv": 1e-4, "restarts": 1, "seed": 0}
