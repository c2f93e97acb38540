"""Two ways a client handles a train message, for ``fedpeft bench``'s ``client_setup_speedup``.

* :class:`RebuildingClient` is a FlowerTune-style client: every ``train()``
  loads the base model from a local checkpoint folder, wraps it with
  ``get_peft_model`` and loads the received adapter state into it.
* :class:`ResidentClient` is fedpeft's: the process's resident model takes the
  received adapter with ``set_payload``.

Both then run the same :func:`fedpeft.training.train_steps` on the same rows
with the same seed, so the only difference :func:`client_round` times is the
set-up, and both give the same first-step loss (a test holds them to it).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from fedpeft.config import Config, batch_sampling, max_rank
from fedpeft.models.lora import to_peft_state
from fedpeft.models.registry import get_model_spec
from fedpeft.runtime import Runtime
from fedpeft.training import EncodedSplit, train_steps
from fedpeft.wire import from_array_record
from strategies import Payload

_AUTO_CLASSES = {"classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}
_TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}


def save_base_checkpoint(cfg: Config, num_labels: int, folder: Path) -> Path:
    """The base model ``cfg`` names, as a user's local Hugging Face folder (``save_pretrained``) in ``folder``.

    Written from fedpeft's own loader, so the folder holds the same weights,
    head shape and dropout settings as the resident model (SmolLM2's is the
    same float32 safetensors as fedpeft's cache of its GGUF file).
    """
    spec = get_model_spec(cfg.model.name, cfg.model.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.federation.seed)  # as the resident model: a new head (or a random model) is seeded
        base, tokenizer = spec.load(num_labels=num_labels, dropout=cfg.model.dropout)
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora_config(cfg: Config) -> LoraConfig:
    """The adapter of ``cfg`` as a peft ``LoraConfig`` (the model's default targets and head when not set)."""
    spec = get_model_spec(cfg.model.name, cfg.model.task)
    p = cfg.peft
    return LoraConfig(r=max_rank(cfg), lora_alpha=p.alpha, target_modules=list(p.target_modules or spec.default_targets),
                      lora_dropout=p.dropout, use_rslora=p.rslora,
                      modules_to_save=list(p.modules_to_save or spec.head_modules) or None,
                      task_type=_TASK_TYPES[spec.task])


class RebuildingClient:
    """A FlowerTune-style client: model and adapter rebuilt from the checkpoint folder for every message."""

    def __init__(self, folder: Path, task: str, lora: LoraConfig):
        self.folder, self.task, self.lora = folder, task, lora

    def setup(self, payload: Payload):
        base = _AUTO_CLASSES[self.task].from_pretrained(self.folder)
        model = get_peft_model(base, copy.deepcopy(self.lora))
        state = {k: torch.from_numpy(v.copy()) for k, v in to_peft_state(payload).items()}
        set_peft_model_state_dict(model, state)
        return model


class ResidentClient:
    """fedpeft's client: the received adapter swapped into the process's resident model."""

    def __init__(self, rt: Runtime):
        self.rt = rt

    def setup(self, payload: Payload):
        self.rt.model.set_payload(payload, trainable=self.rt.strategy.trainable)
        return self.rt.model.model


def client_round(client, message: ArrayRecord, scalings: dict[str, float], cfg: Config, split: EncodedSplit, shard,
                 *, seed: int, steps: int | None = None) -> dict[str, Any]:
    """One train message handled by ``client``: set-up (message in to the start of the first step), then the steps.

    Returns ``setup_s``, ``round_s`` (set-up, ``steps`` local steps and the
    upload's arrays), ``train_loss`` and ``upload`` (the trained tensors by parameter name).
    """
    t = cfg.train
    t0 = time.perf_counter()
    payload = Payload.from_arrays(from_array_record(message), scalings)
    model = client.setup(payload)
    setup = time.perf_counter() - t0
    task = get_model_spec(cfg.model.name, cfg.model.task).task
    metrics = train_steps(model, split, shard, task=task, steps=steps or t.local_steps, batch_size=t.batch_size, lr=t.lr,
                          weight_decay=t.weight_decay, seed=seed, sampling=batch_sampling(cfg), optimizer=t.optimizer,
                          momentum=t.momentum)
    upload = {n: p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}
    return {"setup_s": setup, "round_s": time.perf_counter() - t0, "train_loss": metrics["train_loss"], "upload": upload}
