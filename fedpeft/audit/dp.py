"""The audited victim under sample-level DP: the upload a DP-SGD client sends, and its epsilon.

With ``dp.mode = "sample"`` a fedpeft client runs DP-SGD (opacus per-sample
clipping at ``dp.max_grad_norm`` and Gaussian noise, through
:mod:`fedpeft.privacy.dp_sgd`) and uploads the result. The audit's victim
does the same on the data it holds: its shard is its audit batch, so every
step samples each example with probability ``q = 1`` (Poisson, as the
accountant assumes) and the release the server sees is ``local_steps``
steps of the Gaussian mechanism without amplification. The attacker is told
the batch size, so the relation is replace-one example; the epsilon reported
beside the attack numbers is the accountant's for exactly that release. Its
noise and Poisson draws come from the OS CSPRNG
(:mod:`fedpeft.privacy.secret`), never from the trial's public seed.

The image victim (:mod:`fedpeft.audit.vision`) runs the same mechanism on its
images through :func:`dp_image_upload`.

With ``dp.mode = "client"`` the noise is added by the server to the
aggregate (central DP): a curious server sees each upload before noising,
so the victim's upload is unchanged and the attacks are expected to work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedpeft.devices import fork_rng, model_device
from fedpeft.audit.observe import LocalResult, UploadFn, trainable_restored
from fedpeft.privacy.accountants import accountant_title, compute_epsilon
from fedpeft.privacy.validation import check_delta
from fedpeft.privacy.calibration import calibrate_noise
from fedpeft.privacy.report import PrivacyReport
from fedpeft.privacy.secret import OS_SECRET
from fedpeft.privacy.dp_sgd import (
    DPSGD,
    check_private_model,
    dp_optimizer,
    grad_sample_module,
    per_sample_hooks,
    per_sample_loss,
    poisson_batches,
    private_steps,
)

# The victim's shard is its batch: every example takes part in every step.
VICTIM_SAMPLE_RATE = 1.0
# The attacker knows how many examples the victim holds.
VICTIM_RELATION = "replace-one"


@dataclass(frozen=True)
class VictimDP:
    """The DP-SGD mechanism of one audited victim and what its upload costs.

    Attributes
    ----------
    noise_multiplier : float
        Sigma (calibrated from ``dp.target_epsilon`` when that is set).
    max_grad_norm : float
        Per-example clipping norm C.
    sample_rate : float
        Poisson rate of each example per step (1: the victim's shard is its batch).
    steps : int
        DP-SGD steps in the observed round (``local_steps``).
    delta : float
        ``dp.delta``.
    accountant : str
        ``dp.accountant``.
    target_epsilon : float or None
        The calibration target, if any.
    epsilon : float
        The accountant's epsilon (sample unit, replace-one) of the observed release.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    accountant: str
    target_epsilon: float | None
    epsilon: float

    @property
    def mechanism(self) -> DPSGD:
        return DPSGD(self.noise_multiplier, self.max_grad_norm, self.sample_rate)

    @property
    def report(self) -> PrivacyReport:
        """The guarantee of the observed release (sample unit, replace-one example)."""
        return PrivacyReport(unit="sample", accountant=self.accountant, delta=self.delta,
                             noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=self.steps,
                             epsilon=self.epsilon, history=((self.noise_multiplier, self.sample_rate, self.steps),),
                             relation=VICTIM_RELATION)

    def describe(self) -> str:
        """One line for the report: unit, sigma, C, q, steps, accountant, delta, epsilon."""
        target = f", calibrated for epsilon <= {self.target_epsilon:g}" if self.target_epsilon else ""
        return (f"sample-level DP-SGD: sigma = {self.noise_multiplier:.4g}, C = {self.max_grad_norm:g}, "
                f"q = {self.sample_rate:g}, {self.steps} step(s){target}; {accountant_title(self.accountant)} "
                f"epsilon = {self.epsilon:.3g} (replace-one example) at delta = {self.delta:g}")

    def to_dict(self) -> dict[str, Any]:
        """``audit.json``'s ``dp`` block: the :attr:`report`'s fields and the mechanism's."""
        return {**self.report.to_dict(), "max_grad_norm": self.max_grad_norm, "target_epsilon": self.target_epsilon,
                "describe": self.describe()}


def victim_dp(dp_cfg, local_steps: int, batch_size: int) -> VictimDP | None:
    """The victim's DP-SGD for ``cfg.dp`` (None unless ``dp.mode = "sample"``).

    Raises
    ------
    fedpeft.errors.ConfigError
        If ``dp.delta`` is not below 1 / the victim's examples, or the target
        epsilon cannot be reached.
    """
    if dp_cfg.mode != "sample":
        return None
    delta = check_delta(dp_cfg.delta, batch_size)
    target = dp_cfg.target_epsilon or None
    q = VICTIM_SAMPLE_RATE
    sigma = (calibrate_noise(target, delta, q, local_steps, dp_cfg.accountant, relation=VICTIM_RELATION) if target
             else dp_cfg.noise_multiplier)
    eps = compute_epsilon(sigma, q, local_steps, delta, dp_cfg.accountant, VICTIM_RELATION)
    return VictimDP(float(sigma), float(dp_cfg.max_grad_norm), q, local_steps, delta, dp_cfg.accountant, target, float(eps))


def dp_upload(mechanism: DPSGD, weight_decay: float = 0.0, expected_batch_size: float | None = None) -> UploadFn:
    """An :data:`UploadFn` for a DP-SGD client with ``mechanism``.

    ``expected_batch_size`` divides the noised sum; None means ``q * n`` for
    the ``n`` examples the victim holds, as in ``train_steps``. Where the
    examples held are what is being audited (a canary in or out), pass a
    constant: dividing by the size of the private data set would itself
    reveal whether the canary is there.

    One local step uploads the privatised gradient (clipped per example,
    noised, divided by the expected batch size): DP-FedSGD. Several steps
    upload the weights after them: with ``optimizer = "adamw"`` through
    :func:`fedpeft.training.train_steps` exactly as a ``fedpeft run`` client,
    with ``"sgd"`` through the same opacus pieces around plain SGD.
    """

    def upload(model, batch: dict[str, torch.Tensor], *, lr: float, local_steps: int, optimizer: str, seed: int) -> LocalResult:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        with trainable_restored(model):
            if local_steps > 1 and optimizer == "adamw":
                from fedpeft.training import train_steps

                split, indices = _as_split(batch)
                train_steps(model, split, indices, task="classification", steps=local_steps, batch_size=len(indices), lr=lr,
                            weight_decay=weight_decay, seed=seed, dp=mechanism)
                return LocalResult(after={n: p.detach().cpu().numpy().copy() for n, p in params.items()}, gradients=None)
            grads = _dp_sgd(model, params, batch, mechanism, lr=lr, steps=local_steps, seed=seed,
                            expected=expected_batch_size)
            return LocalResult(after={n: p.detach().cpu().numpy().copy() for n, p in params.items()},
                               gradients=grads if local_steps == 1 else None)

    return upload


def _dp_sgd(model, params: dict, batch: dict[str, torch.Tensor], dp: DPSGD, *, lr: float, steps: int,
            seed: int, expected: float | None = None) -> dict[str, np.ndarray]:
    """``steps`` DP-SGD steps with plain SGD (the loop of ``train_steps``); returns the first step's private gradient."""
    n = len(batch["labels"])
    schedule = poisson_batches(np.arange(n), steps, dp.sample_rate, OS_SECRET.generator("dp-sgd-batches"))
    first: dict[str, np.ndarray] = {}
    model.train()
    device = model_device(model)
    with fork_rng(device), grad_sample_module(model) as forward:
        torch.manual_seed(seed)
        opt = dp_optimizer(torch.optim.SGD(list(params.values()), lr=lr), dp, expected or dp.sample_rate * n,
                           OS_SECRET.torch_generator("dp-sgd-noise", device=device))

        def loss_of(idx):
            sub = {k: v[torch.as_tensor(idx, device=v.device)] for k, v in batch.items()}
            return per_sample_loss(forward(sub["input_ids"], sub["attention_mask"]), sub, "classification").mean()

        for _ in private_steps(opt, schedule, loss_of):
            if not first:
                # After DPOptimizer.step, .grad holds the clipped, noised, averaged gradient.
                first = {k: p.grad.detach().cpu().numpy().astype(np.float32) for k, p in params.items()}
    return first


def dp_image_upload(mechanism: DPSGD):
    """An image victim's upload under DP-SGD (an ``ImageUploadFn`` of :mod:`fedpeft.audit.vision.experiment`).

    The same mechanism as :func:`dp_upload` with plain SGD: opacus per-sample
    gradients of the LoRA factors and head, clipped to C, summed, Gaussian
    noise, divided by the expected batch size ``q * n``. One step returns
    the privatised gradient; more return the update read as a scaled
    gradient, ``(sent - after) / (lr * steps)``. The model's trainable
    tensors are restored afterwards.
    """
    from fedpeft.audit.attacks.gradient_matching import trainable_tensors

    def upload(model, x: torch.Tensor, y: torch.Tensor, *, local_steps: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
        check_private_model(model)
        params = trainable_tensors(model)
        start = {k: p.detach().clone() for k, p in params.items()}
        schedule = poisson_batches(np.arange(len(x)), local_steps, mechanism.sample_rate,
                                   OS_SECRET.generator("dp-sgd-batches"))
        was_training = model.training
        first: dict[str, torch.Tensor] = {}
        try:
            with per_sample_hooks(model) as gsm:
                gsm.train()  # opacus records activations in training mode only
                opt = dp_optimizer(torch.optim.SGD(list(params.values()), lr=lr), mechanism,
                                   mechanism.sample_rate * len(x),
                                   OS_SECRET.torch_generator("dp-sgd-noise", device=model_device(model)))
                for _ in private_steps(opt, schedule, lambda idx: torch.nn.functional.cross_entropy(
                        gsm(x[torch.as_tensor(idx)]), y[torch.as_tensor(idx)])):
                    if not first:
                        # After DPOptimizer.step, .grad holds the clipped, noised, averaged gradient.
                        first = {k: p.grad.detach().clone() for k, p in params.items()}
            if local_steps == 1:
                return first
            return {k: (start[k] - p.detach()) / (lr * local_steps) for k, p in params.items()}
        finally:
            model.train(was_training)
            with torch.no_grad():  # the server's copy goes back to the global state
                for k, p in params.items():
                    p.copy_(start[k])
                    p.grad = None

    return upload


def _as_split(batch: dict[str, torch.Tensor]):
    """The victim's padded batch back as an :class:`EncodedSplit` (for ``train_steps``)."""
    from fedpeft.training import EncodedSplit

    input_ids, mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu().bool()
    ids = tuple(row[m].numpy().astype(np.int64) for row, m in zip(input_ids, mask))
    pads = input_ids[~mask]
    pad_id = int(pads[0]) if len(pads) else 0
    split = EncodedSplit(ids=ids, labels=batch["labels"].cpu().numpy().astype(np.int64), pad_id=pad_id)
    return split, np.arange(len(ids))
