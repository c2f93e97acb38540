"""Build what the server sees of one victim: its payload for one round.

The victim holds one batch of examples, receives the global payload, runs its
local steps and uploads the arrays its strategy sends. :func:`observe` plays
that round on the server's own copy of the model and returns two things kept
strictly apart: the :class:`Observation` (the server's view, handed to
attacks) and the :class:`Truth` (the victim's data, used only for scoring).

How the victim computes its upload is a parameter (:data:`UploadFn`), so a
differentially private client (clipped, noised gradients) plugs in without
touching the attacks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from fedpeft.audit.attacks.base import Observation, wire_key  # noqa: F401  (wire_key: re-exported for callers of observe)
from fedpeft.models.lora import PREFIX
from fedpeft.training import EncodedSplit
from strategies import ClientUpdate, Payload


@dataclass
class Truth:
    """The victim's private data and the activations it produced (for scoring only).

    Attributes
    ----------
    ids : list of np.ndarray
        Token ids of each example, specials included, unpadded.
    labels : np.ndarray
        Label of each example.
    texts : list of str
        The examples' text.
    head_inputs : dict[str, np.ndarray]
        Input of each trained linear head layer (``bert.pooler.dense``,
        ``classifier``) at the victim's first step, one row per example.
    """

    ids: list[np.ndarray]
    labels: np.ndarray
    texts: list[str]
    head_inputs: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LocalResult:
    """What a victim's local work produced, keyed by peft parameter name.

    ``after`` holds every trainable tensor after the local steps; ``gradients``
    the first step's gradient when the client uploads it as such (one step),
    else None.
    """

    after: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray] | None


# (model, batch, lr, local_steps, optimizer, seed) -> LocalResult
UploadFn = Callable[..., LocalResult]


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


def honest_upload(model, batch: dict[str, torch.Tensor], *, lr: float, local_steps: int, optimizer: str, seed: int) -> LocalResult:
    """A client without DP: one step uploads the exact gradient (FedSGD); more
    steps run ``optimizer`` on the same batch and upload the new weights.

    Training mode is on, so base-model dropout (``model.dropout``) masks the
    activations exactly as in ``fedpeft run``.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    with trainable_restored(model) as start, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if local_steps == 1:
            model.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            grads = {n: p.grad.detach().cpu().numpy().astype(np.float32) for n, p in params.items()}
            after = {n: (start[n].cpu().numpy() - lr * grads[n]).astype(np.float32) for n in params}
            return LocalResult(after=after, gradients=grads)
        opt_cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
        opt = opt_cls(list(params.values()), lr=lr)
        for _ in range(local_steps):
            opt.zero_grad(set_to_none=True)
            _loss(model, batch).backward()
            opt.step()
        return LocalResult(after={n: p.detach().cpu().numpy().copy() for n, p in params.items()}, gradients=None)


@contextlib.contextmanager
def trainable_restored(model) -> Iterator[dict[str, torch.Tensor]]:
    """Yield a copy of the trainable tensors; on exit put them back (the server's copy
    returns to the global state after playing a victim) and leave eval mode, no grads."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield start
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n])


@contextlib.contextmanager
def dropout_rate(model, p: float | None) -> Iterator[None]:
    """Temporarily set every dropout module of ``model`` to rate ``p`` (None = leave)."""
    if p is None:
        yield
        return
    mods = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    old = [m.p for m in mods]
    for m in mods:
        m.p = p
    try:
        yield
    finally:
        for m, q in zip(mods, old):
            m.p = q


@contextlib.contextmanager
def capture_head_inputs(resident, into: dict[str, np.ndarray]) -> Iterator[None]:
    """Record the input of each trained head layer on the first forward pass."""
    handles = []
    for name in _head_layers(resident):
        module = resident.model.get_submodule(PREFIX + name).modules_to_save["default"]

        def hook(mod, args, name=name):
            into.setdefault(name, args[0].detach().float().cpu().numpy().copy())

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _head_layers(resident) -> list[str]:
    extras = resident.payload().extras
    return sorted({k[: -len(".weight")] for k in extras if k.endswith(".weight") and k[: -len(".weight")] + ".bias" in extras})


def victim_batch(ids: list[np.ndarray], labels: np.ndarray, pad_id: int,
                 device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Padded model inputs for the victim's examples (the same padding as training), on ``device``."""
    split = EncodedSplit(ids=tuple(ids), labels=np.asarray(labels, dtype=np.int64), pad_id=pad_id)
    return split.batch(np.arange(len(ids)), "classification", device)


def observe(resident, strategy, sent: Payload, truth: Truth, *, lr: float, local_steps: int, optimizer: str = "sgd",
            seed: int = 0, num_labels: int | None = None, dropout: float | None = None,
            upload: UploadFn = honest_upload) -> Observation:
    """Play one round for the victim holding ``truth`` and return the server's view.

    Fills ``truth.head_inputs`` as a side effect (the victim's activations, for
    scoring). The resident model holds ``sent`` again afterwards.

    Parameters
    ----------
    resident : ResidentModel
        The model; the victim trains on it, then the server's view uses it.
    strategy : Strategy
        Decides which factors train and which arrays are uploaded.
    sent : Payload
        The global state the server sends this round.
    truth : Truth
        The victim's examples.
    lr, local_steps, optimizer, seed
        The victim's local training.
    num_labels : int, optional
        Size of the label set, if the server knows it.
    dropout : float, optional
        Override the base model's dropout rate during the victim's steps.
    upload : UploadFn
        How the victim turns its data into an upload (DP clients plug in here).
    """
    resident.set_payload(sent, trainable=strategy.trainable)
    batch = victim_batch(truth.ids, truth.labels, resident.tokenizer.pad_token_id or 0, resident.device)
    with capture_head_inputs(resident, truth.head_inputs), dropout_rate(resident.model, dropout):
        result = upload(resident.model, batch, lr=lr, local_steps=local_steps, optimizer=optimizer, seed=seed)
    sent_arrays = sent.arrays()
    # Frozen factors (e.g. FFA-LoRA's A) come back unchanged.
    after = {**sent_arrays, **{wire_key(n): a for n, a in result.after.items()}}
    local = Payload.from_arrays(after, resident.scalings)
    uploaded = strategy.upload_arrays(ClientUpdate(client_id="victim", factors=local.factors, num_examples=len(truth.ids), extras=local.extras))
    if result.gradients is not None:
        grads = {wire_key(n): g for n, g in result.gradients.items()}
        gradients = {k: grads[k] for k in uploaded}
    else:
        # The update read as a scaled gradient: exact for one SGD step, a
        # sum of gradients at drifting weights after several.
        gradients = {k: (sent_arrays[k] - uploaded[k]) / (lr * local_steps) for k in uploaded}
    return Observation(
        sent=sent_arrays,
        uploaded=uploaded,
        gradients=gradients,
        exact_gradient=result.gradients is not None,
        lr=lr,
        local_steps=local_steps,
        batch_size=len(truth.ids),
        scalings=dict(resident.scalings),
        num_labels=num_labels,
        model=resident,
        modality="text",
        extra={"tokenizer": resident.tokenizer},
    )
