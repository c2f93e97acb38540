"""Local steps of K clients in one forward and backward pass over a shared frozen base.

:func:`train_clients_batched` reproduces, client for client, what
:func:`fedpeft.training.loop.train_steps` does when the clients train one
after another: the same batches (:func:`local_schedule` from each client's
seed), a fresh optimizer per client over its own tensors, and a loss whose
gradient for each client is that client's own mean-loss gradient. Only the
arithmetic is shared: each step stacks the K clients' micro-batches into one
batch and runs the adapters side by side (:class:`StackedLoRA`).

With dropout on, each client draws its masks from its own stream seeded as
it would seed it alone (:mod:`fedpeft.training.client_dropout`), so the
equality holds with dropout too.

With ``dp`` (sample-level DP-SGD) each client takes the step opacus would
give it alone: the same secret Poisson batches and noise generator, its own
per-example gradients (recorded by the stacked layers), flat clipping over
its trainable tensors, its own noise and the same normalisation
(:mod:`fedpeft.privacy.stacked_dp`); an empty draw is a noise-only step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import time

import numpy as np
import torch

from fedpeft.devices import autocast, model_device
from fedpeft.models.resident import ResidentModel
from fedpeft.models.stacked_lora import StackedLoRA
from fedpeft.privacy.dp_sgd import DPSGD, check_private_model, per_sample_loss
from fedpeft.privacy.secret import OS_SECRET, SecretSource
from fedpeft.privacy.stacked_dp import StackedGradSamples, clip_and_noise
from fedpeft.training.batches import EncodedSplit
from fedpeft.training.client_dropout import BlockLayout, ClientDropout
from fedpeft.training.loop import keep_rank_padding_zero, local_schedule, make_optimizer, train_metrics
from strategies import Payload


@dataclass
class ClientResult:
    """One client's outcome: the metrics :func:`train_steps` returns, what it uploads, and each step's loss."""

    metrics: dict[str, float]
    payload: Payload
    losses: list[float]


def train_clients_batched(model: ResidentModel, split: EncodedSplit, shards: Sequence[np.ndarray],
                          seeds: Sequence[int], payloads: Sequence[Payload], *, task: str, steps: int,
                          batch_size: int, lr: float, weight_decay: float, sampling: str = "shuffle",
                          optimizer: str = "adamw", momentum: float = 0.0, dtype: str = "float32",
                          trainable: Callable[[str], dict[str, bool]] | None = None,
                          dp: Sequence[DPSGD] | None = None, secret: SecretSource | None = None) -> list[ClientResult]:
    """Train K clients together; client k starts from ``payloads[k]`` and draws its batches from ``seeds[k]``.

    Each client's losses and final payload equal those of :func:`train_steps`
    run on it alone (to float rounding), with the same ``steps``,
    ``batch_size``, ``lr``, ``weight_decay``, ``sampling``, ``optimizer`` and
    ``momentum``, on the model's device and, with ``dtype = "bfloat16"``,
    under the same autocast; with dropout on, each client's masks are those
    it draws alone from its seed. The resident model is left in eval mode, its own
    adapter holding the last client's received payload.

    ``dp[k]`` (sample-level DP-SGD, one mechanism per client: each has its
    own q) makes client k's steps those :func:`train_steps` takes with
    ``dp=dp[k]``: Poisson batches and noise from ``secret`` (the OS CSPRNG
    when None) keyed by its seed, never from the seed itself; every step
    counts, an empty draw as a noise-only step.

    Returns
    -------
    list of ClientResult
        In the order of ``shards``.
    """
    if not len(shards) == len(seeds) == len(payloads):
        raise ValueError(f"got {len(shards)} shards, {len(seeds)} seeds and {len(payloads)} payloads; one each per client")
    if dp is not None and len(dp) != len(shards):
        raise ValueError(f"got {len(dp)} DP mechanisms for {len(shards)} clients; one each per client")
    net = model.model
    device = model_device(net)
    stack = StackedLoRA(model, payloads, trainable=trainable)
    private = None
    if dp is None:
        schedules = [local_schedule(shard, steps=steps, batch_size=batch_size, seed=seed, sampling=sampling)
                     for shard, seed in zip(shards, seeds)]
    else:
        secret = secret or OS_SECRET
        check_private_model(net)
        schedules, noise = [], []
        for shard, seed, mechanism in zip(shards, seeds, dp):  # in the order a client alone draws them
            schedules.append(local_schedule(shard, steps=steps, batch_size=batch_size, seed=seed, sampling=sampling,
                                            dp=mechanism, secret=secret))
            noise.append(secret.torch_generator("dp-sgd-noise", seed, device=device))
        private = _Private(StackedGradSamples(len(stack)), stack.trained_keys(), noise, list(dp), batch_size)
    optimizers = [make_optimizer(optimizer, c.parameters(), lr=lr, weight_decay=weight_decay, momentum=momentum)
                  for c in stack.clients]
    for opt, client in zip(optimizers, stack.clients):
        keep_rank_padding_zero(opt, client.rank_padding())
    losses: list[list[float]] = [[] for _ in stack.clients]
    dropout = ClientDropout(net, seeds, device)
    lengths = split.lengths()
    net.train()
    started = time.perf_counter()
    try:
        with stack.applied(private.samples if private else None), dropout.applied():
            for step in range(steps):
                chosen = [schedule[step] for schedule in schedules]
                active = [k for k, idx in enumerate(chosen) if len(idx) > 0]  # an empty Poisson draw takes no step
                if private is not None:  # DP-SGD: every client steps, an empty draw with noise only
                    for k, loss in private.step(stack, optimizers, split, chosen, task, device, dtype, dropout, net):
                        losses[k].append(loss)
                    continue
                if not active:
                    continue
                batch = stacked_batch(split, chosen, task, device)
                dropout.layout = BlockLayout(
                    rows=max(len(idx) for idx in chosen), width=batch["input_ids"].shape[1],
                    sizes=tuple((len(idx), int(lengths[idx].max()) if len(idx) else 0) for idx in chosen))
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                with autocast(device, dtype):
                    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    per_client = client_losses(logits, batch, task, len(chosen))
                # The sum, not the mean: each client's gradient is its own mean loss's gradient.
                per_client[active].sum().backward()
                for k in active:
                    optimizers[k].step()
                    losses[k].append(float(per_client[k].detach()))
    finally:
        net.eval()
    # The joint step loop's time, shared equally: the clients' compute_s then sum to it, as
    # sequential clients' do to theirs.
    share = (time.perf_counter() - started) / len(stack)
    return [ClientResult(metrics={**train_metrics(losses[k], schedules[k]), "compute_s": share},
                         payload=stack.clients[k].payload(), losses=losses[k]) for k in range(len(stack))]


@dataclass
class _Private:
    """What a batched DP-SGD step needs: the recorder, the trained tensors' order, each client's noise and mechanism."""

    samples: StackedGradSamples
    keys: list
    generators: list[torch.Generator]
    mechanisms: list[DPSGD]
    expected_batch_size: float

    def step(self, stack: StackedLoRA, optimizers, split: EncodedSplit, chosen: Sequence[np.ndarray], task: str,
             device, dtype: str, dropout: ClientDropout, net) -> list[tuple[int, float]]:
        """One DP-SGD step of every client; returns (client, loss) for the clients that drew rows."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.samples.clear()
        sizes = [len(idx) for idx in chosen]
        out = []
        if any(sizes):
            rows = per_example_grads(net, split, chosen, task, device, dtype, dropout)
            counts = torch.tensor(sizes, dtype=rows.dtype, device=rows.device).clamp(min=1.0)
            means = rows.detach().sum(1) / counts  # each client's mean per-example loss, as opacus's step reports it
            out = [(k, float(means[k])) for k, n in enumerate(sizes) if n]
        clip_and_noise(self.samples, self.keys, [c.tensor for c in stack.clients], sizes, self.mechanisms,
                       self.generators, self.expected_batch_size)
        for opt in optimizers:
            opt.step()
        return out


def per_example_grads(net, split: EncodedSplit, chosen: Sequence[np.ndarray], task: str, device, dtype: str,
                      dropout: ClientDropout) -> torch.Tensor:
    """Forward and backward of the stacked batch of ``chosen`` for per-example gradients; returns the row losses.

    Run inside :meth:`StackedLoRA.applied` with a recorder (which then holds
    each row's gradient) and :meth:`ClientDropout.applied`. The backward
    pass is of the sum of every real row's own loss
    (:func:`~fedpeft.privacy.dp_sgd.per_sample_loss`, what the sequential
    DP-SGD client averages), so each row's recorded gradient is its own
    loss's. Returns the row losses, ``(K, rows)``, zero on filler rows.
    """
    lengths = split.lengths()
    batch = stacked_batch(split, chosen, task, device)
    dropout.layout = BlockLayout(
        rows=max(len(idx) for idx in chosen), width=batch["input_ids"].shape[1],
        sizes=tuple((len(idx), int(lengths[idx].max()) if len(idx) else 0) for idx in chosen))
    k = len(chosen)
    with autocast(device, dtype):
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = per_sample_loss(logits, batch, task)
        rows = (rows * batch["weight"].to(rows.dtype)).view(k, -1)
    rows.sum().backward()
    return rows


def stacked_batch(split: EncodedSplit, index_lists: Sequence[np.ndarray], task: str,
                  device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """K clients' micro-batches as one batch of K blocks with the same rows and length.

    Each client's block is :meth:`EncodedSplit.batch` of its indices, padded
    on the right to the longest example of any client and with filler rows
    to the largest block. A filler row attends to one pad token (so
    attention is defined and nothing becomes NaN), has ``weight`` 0 and,
    for a causal LM, no counted label. Built on the host, returned on
    ``device`` (None = the CPU).
    """
    blocks = [split.batch(idx, task) if len(idx) else None for idx in index_lists]
    rows = max(len(idx) for idx in index_lists)
    width = max(b["input_ids"].shape[1] for b in blocks if b is not None)
    k = len(index_lists)
    ids = torch.full((k, rows, width), split.pad_id, dtype=torch.int64)
    mask = torch.zeros((k, rows, width), dtype=torch.int64)
    mask[:, :, 0] = 1
    weight = torch.zeros((k, rows))
    if task == "causal_lm":
        labels = torch.full((k, rows, width), -100, dtype=torch.int64)
    else:
        labels = torch.zeros((k, rows), dtype=torch.int64)
    for c, b in enumerate(blocks):
        if b is None:
            continue
        n, t = b["input_ids"].shape
        ids[c, :n, :t] = b["input_ids"]
        mask[c, :n] = 0
        mask[c, :n, :t] = b["attention_mask"]
        if task == "causal_lm":
            labels[c, :n, :t] = b["labels"]
        else:
            labels[c, :n] = b["labels"]
        weight[c, :n] = 1.0
    out = {"input_ids": ids.flatten(0, 1), "attention_mask": mask.flatten(0, 1), "labels": labels.flatten(0, 1),
           "weight": weight.flatten()}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def client_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor], task: str, k: int) -> torch.Tensor:
    """Each client block's mean loss, shape ``(K,)``: what :func:`train_steps` computes on that client's batch alone.

    Classification: the mean cross-entropy over the block's real rows. Causal
    LM: the mean next-token loss over the block's counted tokens (the
    model's own shifted loss).
    """
    if logits.dtype != torch.float64:  # half-precision logits: the loss in float32, as transformers computes it
        logits = logits.float()
    if task == "causal_lm":
        targets = batch["labels"][:, 1:]
        token = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                                                  ignore_index=-100, reduction="none").view(k, -1)
        counted = (targets != -100).view(k, -1).to(token.dtype)
        return (token * counted).sum(1) / counted.sum(1).clamp(min=1.0)
    row = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none").view(k, -1)
    weight = batch["weight"].view(k, -1).to(row.dtype)
    return (row * weight).sum(1) / weight.sum(1).clamp(min=1.0)
