"""Gradient-matching machinery shared by the optimisation attacks (DLG, Inverting Gradients, embedding inversion).

The attacker knows the frozen base and the global adapter it sent; it sees
only the gradient (or multi-step update) of the *trainable* tensors, the LoRA
factors and the head. The attacks search for inputs whose payload gradient
matches the observed one; this module holds what they share: the payload's
tensors and their gradients, the victim's simulated upload, the labels read
off the head's bias gradient (:func:`recover_labels`), the matching distances
and the plumbing of the image attacks (:class:`ImageMatching`).

A multi-step update is used as a scaled gradient: the cosine objective
ignores the scale, the L2 one needs ``(sent - uploaded) / (lr * steps)``.

Payload tensors are keyed by their wire names (``lora_A/<module>``,
``lora_B/<module>``, ``extra/<name>``), the same keys the server receives.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from fedpeft.audit.attacks.base import Attack, AttackResult, Observation, checked_params, wire_key
from fedpeft.audit.scoring import IMAGE_METRICS

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


def cosine_distance(g: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1 - cos`` between two payload gradients, over all their tensors at once."""
    # One cosine over the concatenation of every payload tensor (breaching's
    # choice): tensors with large gradients weigh more, as they do on the wire.
    dot = sum((g[k] * target[k]).sum() for k in target)
    gn = sum(g[k].pow(2).sum() for k in target)
    tn = sum(target[k].pow(2).sum() for k in target)
    return 1.0 - dot / (gn.sqrt() * tn.sqrt() + 1e-12)


def l2_distance(g: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance between two payload gradients, summed over their tensors."""
    return sum((g[k] - target[k]).pow(2).sum() for k in target)


def as_tensors(observed: Mapping[str, object], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """An observed payload (arrays by wire key) as float32 tensors on ``device`` (None = the CPU)."""
    return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device) for k, v in observed.items()}


def image_loss(model: nn.Module, labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The victim's loss as a function of candidate images: cross-entropy on the known labels."""
    return lambda x: nn.functional.cross_entropy(model(x), labels)


def torch_model(obs: Observation) -> nn.Module:
    """The torch module inside the observation's model."""
    # A ResidentModel or VisionLoRA wraps the peft model in ``.model``.
    model = obs.model
    return model.model if not isinstance(model, nn.Module) and hasattr(model, "model") else model


def observed_payload(obs: Observation, model: nn.Module) -> dict[str, np.ndarray]:
    """The observation's gradients restricted to the model's trainable tensors (all must be there)."""
    keys = list(trainable_tensors(model))
    missing = [k for k in keys if k not in obs.gradients]
    if missing:
        raise ValueError(f"the payload lacks trainable tensors {missing[:3]}")
    return {k: obs.gradients[k] for k in keys}


class ImageMatching(Attack):
    """Shared plumbing of the image gradient-matching attacks: labels, shape, result."""

    modalities = ("image",)
    recovers = "the victim's images and labels"
    observes = "the LoRA and head gradients"
    metrics = IMAGE_METRICS
    _function: Callable  # the attack function: (model, observed, labels, shape, **params) -> (images, diagnostics)
    _defaults: dict[str, Any] = {}

    def __init__(self, **params: Any) -> None:
        self.params = checked_params(self.name, params, self._defaults, signed=("seed",))

    def applicable(self, obs: Observation) -> str | None:
        reason = super().applicable(obs)
        if reason is None and "image_shape" not in obs.extra:
            reason = f"{self.name} needs the image shape (observation extra 'image_shape')"
        return reason

    def run(self, obs: Observation, prior: Mapping[str, Any] | None = None) -> AttackResult:
        model = torch_model(obs)
        observed = observed_payload(obs, model)
        labels = recover_labels(observed[head_bias_key(observed, obs.num_labels)], obs.batch_size)
        images, diagnostics = type(self)._function(model, observed, labels, tuple(obs.extra["image_shape"]), **self.params)
        return AttackResult(self.name, {"images": images.numpy(), "labels": labels}, diagnostics)
