"""Sample-level DP-SGD for a client's local steps, on opacus.

opacus computes the per-sample gradients (``GradSampleModule`` hooks on the
trainable LoRA and head layers only: the frozen base never gets grad samples),
clips each example's gradient to ``max_grad_norm`` and adds Gaussian noise
(``DPOptimizer`` around the client's AdamW). fedpeft adds what opacus's
``PrivacyEngine`` would otherwise decide for it and that a federation needs
differently:

* batches are Poisson samples of the client's shard (rate ``q = batch / n``),
  drawn from the client's seeded generator, so the accounting assumption
  holds and a run is repeatable; an empty draw still takes a noise-only step;
* the accountant lives with the client across rounds
  (:mod:`fedpeft.privacy.accountants`), not in a per-run engine;
* the hooks are removed after the local steps, because the same resident
  model also evaluates and serves other roles in this process.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from fedpeft.errors import ConfigError


@dataclass(frozen=True)
class DPSGD:
    """The DP-SGD mechanism of one client's local steps.

    Parameters
    ----------
    noise_multiplier : float
        Noise standard deviation over ``max_grad_norm``.
    max_grad_norm : float
        Per-sample clipping norm C (over all trainable tensors together).
    sample_rate : float
        Poisson rate q of each example in each step.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float


def poisson_batches(indices, steps: int, sample_rate: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches, each holding every index independently with probability ``sample_rate``.

    Batch sizes vary and a batch may be empty: that is what the subsampled
    Gaussian's accounting assumes, so neither is "fixed" here.
    """
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("cannot train on an empty shard")
    return [indices[rng.random(len(indices)) < sample_rate] for _ in range(steps)]


def check_private_model(model: torch.nn.Module) -> None:
    """Refuse models DP-SGD cannot privatise correctly here.

    A trainable embedding table would need per-sample gradients of a lookup
    shared across positions (and, with ghost clipping, is not supported by
    opacus at all); fedpeft keeps embeddings frozen under DP.
    """
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError("dp.mode = 'sample' needs trainable parameters, and this model has none")
    embeddings = [
        f"{name}.{pname}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Embedding)
        for pname, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]
    if embeddings:
        raise ConfigError(
            f"dp.mode = 'sample' with trainable embeddings ({embeddings[0]}) is not supported: "
            "remove embedding layers from peft.target_modules"
        )


class LogitsModule(torch.nn.Module):
    """A transformers model as a module that returns logits only.

    opacus hooks need plain tensors in and out; ``position_ids`` are passed
    with a batch dimension because grad samplers assume every input is batched.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n, width = input_ids.shape
        position_ids = torch.arange(width, device=input_ids.device).expand(n, width)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def per_sample_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """One loss per example: cross-entropy, or the mean next-token loss of each sequence."""
    if task == "causal_lm":
        targets = batch["labels"][:, 1:]
        token_loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        valid = (targets != -100).float()
        return (token_loss * valid).sum(1) / valid.sum(1).clamp(min=1.0)
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")


GRAD_SAMPLE_ATTRIBUTES = ("grad_sample", "summed_grad")
"""What opacus's hooks and ``DPOptimizer`` leave on each parameter."""


def remove_grad_sample_hooks(gsm: GradSampleModule) -> None:
    """Remove opacus's hooks from ``gsm`` and the per-sample state they left on its parameters.

    The model stays resident and serves evaluation, the next round and the
    audit in the same process: a hook left behind would record every later
    forward pass, and a stale ``grad_sample`` would be clipped into the next
    DP step.
    """
    gsm.remove_hooks()
    for p in gsm.parameters():
        for attr in GRAD_SAMPLE_ATTRIBUTES:
            if hasattr(p, attr):
                delattr(p, attr)


@contextmanager
def per_sample_hooks(module: torch.nn.Module) -> Iterator[GradSampleModule]:
    """``module`` inside opacus's ``GradSampleModule``; hooks and per-sample state removed on exit.

    Used by training (:func:`grad_sample_module`) and by the audit's image
    victim alike, so both clean up the same way.
    """
    gsm = GradSampleModule(module, loss_reduction="mean", strict=True)
    try:
        with warnings.catch_warnings():
            # Frozen inputs (embeddings, images) make the first hooked layer's input
            # need no grad; torch warns, yet the hooks see every activation they need.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield gsm
    finally:
        remove_grad_sample_hooks(gsm)


@contextmanager
def grad_sample_module(model: torch.nn.Module) -> Iterator[GradSampleModule]:
    """``model`` (returning logits) with opacus per-sample-gradient hooks, removed on exit."""
    check_private_model(model)
    with per_sample_hooks(LogitsModule(model)) as gsm:
        yield gsm


def dp_optimizer(optimizer: torch.optim.Optimizer, dp: DPSGD, expected_batch_size: float,
                 generator: torch.Generator) -> DPOptimizer:
    """opacus's clip-and-noise wrapper around ``optimizer``.

    ``expected_batch_size`` is ``q * n``: with Poisson batches the average
    must divide by the expected size, not the drawn one, or the batch size
    itself would leak.
    """
    return DPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )


def noise_only_step(optimizer: DPOptimizer) -> None:
    """The step for an empty Poisson batch: no gradient, only noise.

    Skipping it would reveal that the batch was empty, which depends on
    whether a record was present.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def grad_samples_to_param_dtype(optimizer: DPOptimizer) -> None:
    """Cast each parameter's per-sample gradients to the parameter's dtype (float32) before clipping.

    Under bfloat16 autocast opacus's grad samplers compute per-sample
    gradients in bfloat16 (the dtype of the backpropagated activations), and
    ``DPOptimizer`` would take each example's norm, and so its clipping
    factor, in bfloat16 (8 bits of mantissa: norms off by up to 0.4%). The
    clipping bound the accountant relies on is computed in float32 instead.
    """
    for p in optimizer.params:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor) and gs.dtype != p.dtype:
            p.grad_sample = gs.to(p.dtype)
        elif isinstance(gs, list):
            p.grad_sample = [g.to(p.dtype) for g in gs]


def private_steps(optimizer: DPOptimizer, schedule: Iterable[np.ndarray],
                  loss_of: Callable[[np.ndarray], torch.Tensor]) -> Iterator[float | None]:
    """One DP-SGD step per Poisson batch of ``schedule``; yields after each step.

    ``loss_of(indices)`` is the mean per-sample loss of a batch through the
    hooked model. Yields the step's loss, or None for the noise-only step of
    an empty batch, so a caller can look at the privatised ``.grad`` (or the
    weights) between steps.
    """
    for indices in schedule:
        optimizer.zero_grad(set_to_none=True)
        if len(indices) == 0:
            noise_only_step(optimizer)
            yield None
            continue
        loss = loss_of(indices)
        loss.backward()
        grad_samples_to_param_dtype(optimizer)
        optimizer.step()
        yield float(loss.detach())
