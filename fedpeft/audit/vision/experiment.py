"""Run a gradient-matching attack on many image victims and summarise it against the prior.

Each victim is a batch of private images (never seen by the base model). The
victim computes its payload, one gradient step or several local SGD steps on
that batch; the attacker recovers the labels from the head bias gradient,
inverts the payload, and its reconstructions are matched to the originals and
scored next to the prior-only guess (the public mean image).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from fedpeft.audit import image_metrics
from fedpeft.audit.attacks.dlg import deep_leakage
from fedpeft.audit.attacks.gradient_matching import client_upload, head_bias_key, recover_labels
from fedpeft.audit.attacks.inverting_gradients import invert_gradients
from fedpeft.audit.metrics import Interval, bootstrap_ci
from fedpeft.audit.vision.model import VisionLoRA, advance_global_state, lora_cnn

ATTACKS = {"inverting-gradients": invert_gradients, "dlg": deep_leakage}

# (model, images, labels, *, local_steps, lr, seed) -> the payload read as a gradient, by wire key
ImageUploadFn = Callable[..., dict[str, torch.Tensor]]


def honest_image_upload(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, lr: float,
                        seed: int) -> dict[str, torch.Tensor]:
    """A victim without DP: its gradient (one step) or its SGD update read as a scaled gradient."""
    return client_upload(model, lambda m: nn.functional.cross_entropy(m(x), y), local_steps, lr)


@dataclass
class ImageAttackSummary:
    """Per-victim scores of one attack and of the prior, with bootstrap 95% intervals."""

    attack: str
    dataset: str
    victims: int
    batch_size: int
    local_steps: int
    global_state: str
    psnr: list[float] = field(default_factory=list)  # per image, after best matching
    ssim: list[float] = field(default_factory=list)
    baseline_psnr: list[float] = field(default_factory=list)
    baseline_ssim: list[float] = field(default_factory=list)
    label_accuracy: float = 0.0
    labels: list[list[int]] = field(default_factory=list)  # each victim's true labels
    recovered_labels: list[list[int]] = field(default_factory=list)  # ... and those read off the head bias
    seconds_per_victim: float = 0.0
    reconstructions: list[np.ndarray] = field(default_factory=list, repr=False)
    originals: list[np.ndarray] = field(default_factory=list, repr=False)

    def intervals(self, seed: int = 0) -> dict[str, Interval]:
        """``metric -> Interval`` (mean and bootstrap 95% interval over images) for the attack and the baseline."""
        return {k: bootstrap_ci(getattr(self, k), seed=seed) for k in ("psnr", "ssim", "baseline_psnr", "baseline_ssim")}

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("reconstructions", "originals")}
        d["intervals"] = {k: v.to_dict() for k, v in self.intervals().items()}
        return d


def run_image_attack(attack: str = "inverting-gradients", dataset: str = "digits", victims: int = 20,
                     batch_size: int = 1, local_steps: int = 1, client_lr: float = 0.1, r: int = 4,
                     global_state: str = "fresh", noise_only: bool = False, seed: int = 0,
                     vlora: VisionLoRA | None = None, upload: ImageUploadFn = honest_image_upload, attack_seed: int = 0,
                     on_victim: Callable[[int], object] | None = None, **attack_params) -> ImageAttackSummary:
    """Attack ``victims`` disjoint batches of private images and score every image.

    Parameters
    ----------
    attack : {"inverting-gradients", "dlg"}
        Which optimisation attack.
    dataset : {"digits", "mnist"}
        Image set (its base model is trained and cached on first use).
    victims, batch_size : int
        Number of victim batches and images per batch.
    local_steps, client_lr : int, float
        The victim's local SGD steps on its batch and their step size; more
        than one step makes the payload an update, read as a scaled gradient.
    r : int
        LoRA rank.
    global_state : {"fresh", "trained"}
        The adapter the server sends: peft's initial one (``B = 0``, first
        round) or one trained a few steps on public data (a later round;
        this advances ``vlora`` in place when one is given).
    noise_only : bool
        Negative control: replace the payload by Gaussian noise of the same
        size, so the attack has nothing to invert.
    seed : int
        Seeds the victims' choice, the noise and the attack's restarts.
    vlora : VisionLoRA, optional
        A ready model (tests reuse one); otherwise built from ``dataset`` and ``r``.
    upload : ImageUploadFn
        How a victim computes its payload: :func:`honest_image_upload`, or a
        DP-SGD client (:func:`fedpeft.audit.dp.dp_image_upload`).
    attack_seed : int
        Added to the restarts' seed only, so the victims stay the same when
        it changes (every attack of an audit sees the same victims).
    on_victim : callable, optional
        Called with the victim's index after each victim (progress display).
    **attack_params
        Passed to the attack function (``iterations``, ``restarts``, ...).
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack {attack!r} is not one of {sorted(ATTACKS)}")
    if global_state not in ("fresh", "trained"):
        raise ValueError(f"global_state {global_state!r} must be 'fresh' or 'trained'")
    vlora = vlora or lora_cnn(dataset, r=r)
    if global_state == "trained":
        advance_global_state(vlora, seed=seed)
    data = vlora.data
    need = victims * batch_size
    if need > len(data.private_images):
        raise ValueError(f"{need} victim images requested, {len(data.private_images)} private images exist")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.private_images))[:need].reshape(victims, batch_size)
    summary = ImageAttackSummary(attack, data.name, victims, batch_size, local_steps, global_state)
    prior = data.mean_image()
    correct, elapsed = 0, 0.0
    for v, idx in enumerate(order):
        x = torch.from_numpy(np.array(data.private_images[idx]))
        y = torch.from_numpy(np.array(data.private_labels[idx]))
        observed = upload(vlora.model, x, y, local_steps=local_steps, lr=client_lr, seed=seed + v)
        if noise_only:
            gen = torch.Generator().manual_seed(seed * 7919 + v)
            observed = {k: torch.randn(g.shape, generator=gen) * g.std().clamp_min(1e-8) for k, g in observed.items()}
        labels = recover_labels(observed[head_bias_key(observed, data.num_classes)].numpy(), batch_size)
        correct += _multiset_hits(labels, y.tolist())
        summary.labels.append(y.tolist())
        summary.recovered_labels.append(labels)
        start = time.perf_counter()
        rec, _ = ATTACKS[attack](vlora.model, observed, labels, data.shape, seed=seed + attack_seed + v, **attack_params)
        elapsed += time.perf_counter() - start
        scores = image_metrics.score_batch(rec, x)
        base = image_metrics.score_prior(prior, x)
        summary.psnr += scores.psnr.tolist()
        summary.ssim += scores.ssim.tolist()
        summary.baseline_psnr += base.psnr.tolist()
        summary.baseline_ssim += base.ssim.tolist()
        summary.reconstructions.append(rec.numpy()[image_metrics.best_matching(rec, x)])
        summary.originals.append(x.numpy())
        if on_victim is not None:
            on_victim(v)
    summary.label_accuracy = correct / need
    summary.seconds_per_victim = elapsed / victims
    return summary


def _multiset_hits(predicted: list[int], true: list[int]) -> int:
    remaining = list(true)
    hits = 0
    for p in predicted:
        if p in remaining:
            remaining.remove(p)
            hits += 1
    return hits
