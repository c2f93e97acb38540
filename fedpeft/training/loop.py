"""Local optimisation steps and evaluation of a (peft) model on encoded data."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack

import numpy as np
import torch

from fedpeft.devices import autocast, fork_rng, model_device
from fedpeft.privacy.dp_sgd import DPSGD, dp_optimizer, grad_sample_module, per_sample_loss, poisson_batches, private_steps
from fedpeft.privacy.secret import OS_SECRET, SecretSource
from fedpeft.training.batches import EncodedSplit


def _forward_loss(model, batch: dict[str, torch.Tensor], task: str):
    if task == "causal_lm":
        out = model(**batch)
        return out.loss, out.logits
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, labels), logits


def batch_schedule(indices: np.ndarray, steps: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``steps`` batches drawn epoch by epoch without replacement from ``indices``."""
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("cannot train on an empty shard")
    size = min(batch_size, len(indices))
    order, pos, out = rng.permutation(indices), 0, []
    for _ in range(steps):
        if pos + size > len(order):
            order, pos = rng.permutation(indices), 0
        out.append(order[pos : pos + size])
        pos += size
    return out


def local_schedule(indices, *, steps: int, batch_size: int, seed: int, sampling: str = "shuffle",
                   dp: DPSGD | None = None, secret: SecretSource | None = None) -> list[np.ndarray]:
    """The example indices of each of a client's ``steps`` local steps (an empty array: an empty Poisson draw).

    The one place a client's data order is decided, so sequential
    (:func:`train_steps`) and batched training
    (:func:`fedpeft.training.batched.train_clients_batched`) see the same
    batches. Without ``dp`` the order depends only on ``seed``; with ``dp``
    the Poisson draws come from ``secret`` (the OS CSPRNG when None), never
    from the public seed.
    """
    if dp is not None:
        secret = secret or OS_SECRET
        return poisson_batches(indices, steps, dp.sample_rate, secret.generator("dp-sgd-batches", seed))
    rng = np.random.default_rng(seed)
    if sampling == "poisson":
        return poisson_batches(indices, steps, min(1.0, batch_size / len(indices)), rng)
    return batch_schedule(indices, steps, batch_size, rng)


def make_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    """The local optimizer ``train.optimizer`` names, fresh for each round (no state crosses rounds)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"train.optimizer = {name!r} is not valid; choose adamw or sgd")


def keep_rank_padding_zero(optimizer: torch.optim.Optimizer, padded: list[tuple[torch.Tensor, torch.Tensor, int]]):
    """Zero the rank-padding rows of A and columns of B (``padded``: ``(A, B, rank)``) after every step.

    Without DP their gradients are exactly zero, so they would stay zero
    anyway. DP-SGD noises every trained coordinate, padding included, and a
    noised padding row of A times a noised padding column of B adds a term to
    the client's model that its rank-r upload cannot carry: the client would
    train a different model from the one it sends, and spend part of its
    clipping bound on gradients that are thrown away. Zeroing after the
    noise is post-processing, so the guarantee is unchanged. Register on the
    plain optimizer: opacus's DP optimizer steps through it.
    """
    if not padded:
        return

    def zero(*_):
        with torch.no_grad():
            for A, B, r in padded:
                A[r:].zero_()
                B[:, r:].zero_()

    optimizer.register_step_post_hook(zero)


def train_steps(model, split: EncodedSplit, indices, *, task: str, steps: int, batch_size: int, lr: float,
                weight_decay: float, seed: int, sampling: str = "shuffle", dp: DPSGD | None = None,
                secret: SecretSource | None = None, optimizer: str = "adamw", momentum: float = 0.0,
                dtype: str = "float32", step_losses: list[float] | None = None,
                rank_padding: list[tuple[torch.Tensor, torch.Tensor, int]] = ()) -> dict[str, float]:
    """Run ``steps`` optimizer steps (``"adamw"``, or ``"sgd"`` with ``momentum``) on the trainable
    parameters; returns train metrics.

    Everything runs on the model's device: batches, optimizer state and the
    DP noise. ``dtype`` is ``model.dtype``: ``"bfloat16"`` runs the forward
    pass under autocast; the backward pass, the weights and (under DP) the
    clipped per-sample gradients stay float32.

    Without ``dp``, batches and dropout depend only on ``seed``, so a
    client's work is reproducible whichever worker process runs it.
    ``sampling`` is ``"shuffle"`` (epochs without replacement, fixed batch
    size) or ``"poisson"`` (each example independently, rate
    ``batch_size / n``). With ``dp`` the steps are DP-SGD (opacus per-sample
    clipping and noise on Poisson batches at ``dp.sample_rate``), and the
    Poisson draws and the noise come from ``secret`` (the OS CSPRNG when
    None), never from ``seed``: the seed is public, and whoever knows a
    mechanism's randomness can subtract it. ``step_losses``, when given,
    receives the loss of every step taken (empty draws take none).
    ``rank_padding`` (:meth:`ResidentModel.rank_padding`) is kept at zero
    after every step (:func:`keep_rank_padding_zero`).

    The returned ``compute_s`` is the wall time of the step loop (forward,
    backward, optimizer steps and their batches): what a round's time would
    be without any framework around it. The client keeps it to itself under DP.
    """
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer, params, lr=lr, weight_decay=weight_decay, momentum=momentum)
    keep_rank_padding_zero(optimizer, list(rank_padding))
    if dp is not None:
        secret = secret or OS_SECRET
    schedule = local_schedule(indices, steps=steps, batch_size=batch_size, seed=seed, sampling=sampling, dp=dp,
                              secret=secret)
    model.train()
    losses = []
    started = time.perf_counter()
    with fork_rng(device), ExitStack() as stack:
        torch.manual_seed(seed)  # dropout masks, on the CPU and on CUDA alike
        if dp is not None:
            forward = stack.enter_context(grad_sample_module(model))
            # Divide by the configured batch size (q * n when n >= it), a public
            # constant: a divisor that depends on the shard would itself leak.
            noise = secret.torch_generator("dp-sgd-noise", seed, device=device)
            optimizer = dp_optimizer(optimizer, dp, batch_size, noise)

            def private_loss(batch_idx):
                batch = split.batch(batch_idx, task, device)
                with autocast(device, dtype):
                    return per_sample_loss(forward(batch["input_ids"], batch["attention_mask"]), batch, task).mean()

            losses = [loss for loss in private_steps(optimizer, schedule, private_loss) if loss is not None]
        else:
            for batch_idx in schedule:
                if len(batch_idx) == 0:  # an empty Poisson draw
                    continue
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    loss, _ = _forward_loss(model, split.batch(batch_idx, task, device), task)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
    compute = time.perf_counter() - started
    model.eval()
    if step_losses is not None:
        step_losses.extend(losses)
    return {**train_metrics(losses, schedule), "compute_s": compute}


def train_metrics(losses: list[float], schedule: list[np.ndarray]) -> dict[str, float]:
    """A client's train metrics: its mean step loss (nan if it took no step), steps and mean batch size."""
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(len(schedule)),
            "mean_batch_size": float(np.mean([len(b) for b in schedule]))}


@torch.inference_mode()
def evaluate(model, split: EncodedSplit, *, task: str, batch_size: int, limit: int = 0,
             dtype: str = "float32") -> dict[str, float]:
    """Accuracy and mean loss (plus perplexity for a causal LM) on ``split``.

    Examples are batched by length so padding costs little; the result does not
    depend on the order. Batches go to the model's device; ``dtype``
    (``model.dtype``) ``"bfloat16"`` runs the forward passes under autocast.
    """
    device = model_device(model)
    n = len(split) if limit <= 0 else min(limit, len(split))
    lengths = split.lengths()[:n]
    order = np.argsort(lengths, kind="stable")
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for start in range(0, n, batch_size):
        batch = split.batch(order[start : start + batch_size], task, device)
        with autocast(device, dtype):
            loss, logits = _forward_loss(model, batch, task)
        if task == "causal_lm":
            targets = batch["labels"][:, 1:]
            valid = targets != -100
            tokens = float(valid.sum())
            correct += float(((logits[:, :-1].argmax(-1) == targets) & valid).sum())
            loss_sum += float(loss) * tokens
            count += tokens
        else:
            correct += float((logits.argmax(-1) == batch["labels"]).sum())
            loss_sum += float(loss) * len(batch["labels"])
            count += len(batch["labels"])
    model.train(was_training)
    metrics = {"accuracy": correct / count, "loss": loss_sum / count}
    if task == "causal_lm":
        metrics["perplexity"] = math.exp(metrics["loss"])
    return metrics
