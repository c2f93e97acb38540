"""Optimisation-based gradient matching on the PEFT payload: Inverting Gradients and DLG.

The attacker knows the frozen base and the global adapter it sent; it sees
only the gradient (or multi-step update) of the *trainable* tensors, the LoRA
factors and the head. It searches for inputs whose payload gradient matches
the observed one:

- Inverting Gradients (Geiping et al. 2020): ``1 - cos(g(x'), g_obs) +
  lambda * TV(x')``, Adam on signed gradients with step decay, pixels boxed to
  [0, 1], several random restarts; the restart with the lowest matching loss
  wins (the attacker cannot compare with the truth).
- DLG (Zhu et al. 2019) with iDLG labels (Zhao et al. 2020): squared L2
  gradient distance minimised with L-BFGS.

Labels come from the head's bias gradient (:func:`recover_labels`). A
multi-step update is used as a scaled gradient: the cosine objective ignores
the scale, DLG needs ``(sent - uploaded) / (lr * steps)``.

Payload tensors are keyed by their wire names (``lora_A/<module>``,
``lora_B/<module>``, ``extra/<name>``), the same keys the server receives.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation, checked_params, wire_key
from fedpeft.audit.attacks.registry import register_attack

LossFn = Callable[[nn.Module], torch.Tensor]


def trainable_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """The payload's tensors (LoRA factors and head) of a peft model, by wire key."""
    return {wire_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def payload_gradients(model: nn.Module, loss: torch.Tensor, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of ``loss`` with respect to each payload tensor (and nothing else)."""
    params = trainable_tensors(model)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
    return dict(zip(params, grads))


def client_upload(model: nn.Module, loss_fn: LossFn, local_steps: int = 1, lr: float = 0.1) -> dict[str, torch.Tensor]:
    """What a victim's payload reveals as a gradient, after ``local_steps`` SGD steps on its batch.

    With one step this is the exact gradient. With more it is the update
    read as a scaled gradient, ``(sent - uploaded) / (lr * steps)``, the
    same normalisation :class:`~fedpeft.audit.attacks.base.Observation` uses.
    The model's trainable tensors are restored afterwards.
    """
    params = trainable_tensors(model)
    if local_steps == 1:
        return {k: g.detach().clone() for k, g in payload_gradients(model, loss_fn(model)).items()}
    sent = {k: p.detach().clone() for k, p in params.items()}
    try:
        for _ in range(local_steps):
            grads = payload_gradients(model, loss_fn(model))
            with torch.no_grad():
                for k, p in params.items():
                    p.sub_(lr * grads[k])
        return {k: (sent[k] - p.detach()) / (lr * local_steps) for k, p in params.items()}
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sent[k])


def head_bias_key(grads: Mapping[str, object], num_classes: int | None = None) -> str:
    """The wire key of the classification head's bias: the last ``extra/*.bias`` of the right size."""
    keys = [k for k, g in grads.items() if k.startswith("extra/") and k.endswith(".bias")
            and (num_classes is None or np.shape(g) == (num_classes,))]
    if not keys:
        raise ValueError("the payload has no trainable head bias; label recovery needs one")
    return keys[-1]


def recover_labels(bias_grad, batch_size: int = 1) -> list[int]:
    """Labels from the head's bias gradient (iDLG, extended greedily to batches).

    The bias gradient of a mean cross-entropy loss is ``mean_i (softmax_i -
    onehot(y_i))``: for one example only the true class is negative, so the
    label is the argmin. For a batch, ``n * g_c + count_c`` is the summed
    softmax mass of class ``c`` (non-negative), so a class with a negative
    entry is present. Labels are taken one at a time from the most negative
    residual, adding 1 back after each pick (which recovers counts while the
    softmax mass is small, i.e. an untrained head), and while any class is
    negative the picks stay among the negative classes (a confident model
    leaves a repeated class only slightly negative, and an absent class
    never negative).
    """
    grad = np.asarray(bias_grad, dtype=np.float64)
    residual = grad * batch_size
    present = np.flatnonzero(grad < 0)
    pool = present if present.size else np.arange(grad.size)
    labels = []
    for _ in range(batch_size):
        c = int(pool[np.argmin(residual[pool])])
        labels.append(c)
        residual[c] += 1.0
    return sorted(labels)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _cosine_distance(g: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # One cosine over the concatenation of every payload tensor (breaching's
    # choice): tensors with large gradients weigh more, as they do on the wire.
    dot = sum((g[k] * target[k]).sum() for k in target)
    gn = sum(g[k].pow(2).sum() for k in target)
    tn = sum(target[k].pow(2).sum() for k in target)
    return 1.0 - dot / (gn.sqrt() * tn.sqrt() + 1e-12)


def _l2_distance(g: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return sum((g[k] - target[k]).pow(2).sum() for k in target)


def _as_tensors(observed: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in observed.items()}


def _image_loss(model: nn.Module, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: nn.functional.cross_entropy(model(x), labels)


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
    target = _as_tensors(observed)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    loss_of = _image_loss(model, labels)
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
            objective = _cosine_distance(g, target) + tv * total_variation(x)
            (grad_x,) = torch.autograd.grad(objective, [x])
            x.grad = grad_x.sign()  # signed gradients, as in Geiping et al.
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(*bounds)
        g = payload_gradients(model, loss_of(x), create_graph=False)
        final = float((_cosine_distance(g, target) + tv * total_variation(x)).detach())
        if final < best_loss:
            best, best_loss = x.detach().clone(), final
    return best, {"match_loss": best_loss, "seconds": time.perf_counter() - start}


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
    target = _as_tensors(observed)
    labels = torch.as_tensor(list(labels), dtype=torch.long)
    loss_of = _image_loss(model, labels)
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
            d = scale * _l2_distance(g, target)
            (x.grad,) = torch.autograd.grad(d, [x])
            return d

        for _ in range(iterations):
            d = opt.step(closure)
            if not torch.isfinite(d):
                break
        with torch.no_grad():
            x.clamp_(*bounds)
        g = payload_gradients(model, loss_of(x), create_graph=False)
        final = float(scale * _l2_distance(g, target))
        if final < best_loss or best is None:
            best, best_loss = x.detach().clone(), final
    return best, {"match_loss": best_loss, "seconds": time.perf_counter() - start}


def _torch_model(obs: Observation) -> nn.Module:
    # A ResidentModel or VisionLoRA wraps the peft model in ``.model``.
    model = obs.model
    return model.model if not isinstance(model, nn.Module) and hasattr(model, "model") else model


def _observed_payload(obs: Observation, model: nn.Module) -> dict[str, np.ndarray]:
    """The observation's gradients restricted to the model's trainable tensors (all must be there)."""
    keys = list(trainable_tensors(model))
    missing = [k for k in keys if k not in obs.gradients]
    if missing:
        raise ValueError(f"the payload lacks trainable tensors {missing[:3]}")
    return {k: obs.gradients[k] for k in keys}


class _ImageMatching(Attack):
    """Shared plumbing of the image gradient-matching attacks: labels, shape, result."""

    modalities = ("image",)
    _function: Callable = staticmethod(invert_gradients)
    _defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        self.params = checked_params(self.name, params, self._defaults, signed=("seed",))

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason is None and "image_shape" not in obs.extra:
            reason = f"{self.name} needs the image shape (observation extra 'image_shape')"
        return reason

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        model = _torch_model(obs)
        observed = _observed_payload(obs, model)
        labels = recover_labels(observed[head_bias_key(observed, obs.num_labels)], obs.batch_size)
        images, diagnostics = type(self)._function(model, observed, labels, tuple(obs.extra["image_shape"]), **self.params)
        return AttackResult(self.name, {"images": images.numpy(), "labels": labels}, diagnostics)


@register_attack("inverting-gradients")
class InvertingGradients(_ImageMatching):
    """Registered wrapper of :func:`invert_gradients` (parameters: its keyword arguments)."""

    summary = "Inverting Gradients: cosine gradient matching + TV prior, Adam with restarts (images)"
    _function = staticmethod(invert_gradients)
    _defaults = {"iterations": 1000, "lr": 0.1, "tv": 1e-4, "restarts": 1, "seed": 0}


@register_attack("dlg")
class DeepLeakage(_ImageMatching):
    """Registered wrapper of :func:`deep_leakage` (parameters: its keyword arguments)."""

    summary = "DLG: L2 gradient matching with L-BFGS, labels from the head bias (images)"
    _function = staticmethod(deep_leakage)
    _defaults = {"iterations": 20, "restarts": 1, "seed": 0}
