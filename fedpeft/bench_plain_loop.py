"""The federated loop a user writes in an afternoon, the baseline ``fedpeft bench`` holds fedpeft's default run to.

OpenFedLLM-style FedIT in one process: a transformers model with a peft
LoRA adapter, the sampled clients trained one after another with AdamW, their
peft state dicts averaged by example count, and the model evaluated once, at
the end. Only torch, transformers and peft, plus fedpeft's data loading (the
same rows, split and shards as the federation it is compared with).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedpeft.config import Config
from fedpeft.data import load_dataset, partition_indices
from fedpeft.validation import data_columns


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """The clients' peft state dicts averaged key by key, each weighted by its number of examples (FedIT)."""
    weights = torch.tensor(num_examples, dtype=torch.float64)
    weights = weights / weights.sum()
    return {key: sum(w * state[key].double() for w, state in zip(weights, states)).float() for key in states[0]}


class Collator:
    """Pads pre-tokenised examples into a batch (what ``DataCollatorWithPadding`` does)."""

    def __init__(self, tokenizer, encoded: Mapping[str, list], labels: np.ndarray):
        self.tokenizer, self.encoded, self.labels = tokenizer, encoded, labels

    def __call__(self, rows) -> dict[str, torch.Tensor]:
        features = [{"input_ids": self.encoded["input_ids"][i], "attention_mask": self.encoded["attention_mask"][i]}
                    for i in rows]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = torch.as_tensor(self.labels[np.asarray(rows)], dtype=torch.long)
        return dict(batch)


def local_train(model, collate: Collator, indices: np.ndarray, *, steps: int, batch_size: int, lr: float,
                weight_decay: float, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps on shuffled batches of ``indices``; returns the adapter's peft state dict."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    size = min(batch_size, len(indices))
    order, pos = rng.permutation(indices), 0
    model.train()
    for _ in range(steps):
        if pos + size > len(order):
            order, pos = rng.permutation(indices), 0
        loss = model(**collate(order[pos : pos + size])).loss
        pos += size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


@torch.inference_mode()
def accuracy(model, collate: Collator, n: int, batch_size: int) -> float:
    """Test accuracy of ``model`` on the first ``n`` encoded test rows."""
    correct = 0
    for start in range(0, n, batch_size):
        batch = collate(range(start, min(start + batch_size, n)))
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / n


def run_plain_loop(cfg: Config, base_folder: str | Path, *, target_modules: Sequence[str],
                   modules_to_save: Sequence[str]) -> dict[str, Any]:
    """FedIT on ``cfg``'s rounds, clients, steps, batch size, lr, data and test set; the base model from ``base_folder``.

    Parameters
    ----------
    cfg : Config
        The federation (classification only: ``model.task`` of a sequence classifier).
    base_folder : path
        A Hugging Face model folder (``save_pretrained``) with the classification head.
    target_modules, modules_to_save : sequence of str
        LoRA's adapted modules and the head trained in full, as in the federation.

    Returns
    -------
    dict
        ``accuracy`` (final, on the configured test set), ``wall_s`` (from loading the model to the
        final accuracy) and ``rounds``.
    """
    t0 = time.perf_counter()
    fed, d, t = cfg.federation, cfg.data, cfg.train
    data = load_dataset(d.dataset, test_fraction=d.test_fraction, columns=data_columns(cfg))
    shards = partition_indices(data, d.partition, fed.num_clients, alpha=d.alpha, seed=fed.seed,
                               max_examples_per_client=d.max_examples_per_client or None)
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    torch.manual_seed(fed.seed)
    base = AutoModelForSequenceClassification.from_pretrained(base_folder)
    lora = LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, target_modules=list(target_modules),
                      lora_dropout=cfg.peft.dropout, use_rslora=cfg.peft.rslora, modules_to_save=list(modules_to_save),
                      task_type=TaskType.SEQ_CLS)
    model = get_peft_model(base, lora)

    def tokenize(texts):
        return tokenizer(list(texts), truncation=True, max_length=cfg.model.max_length)

    train = Collator(tokenizer, tokenize(data.train_texts), data.train_labels)
    n_test = len(data.test_texts) if d.max_test_examples <= 0 else min(d.max_test_examples, len(data.test_texts))
    test = Collator(tokenizer, tokenize(data.test_texts[:n_test]), data.test_labels[:n_test])

    rng = np.random.default_rng(fed.seed)
    per_round = fed.clients_per_round or fed.num_clients
    global_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    for _ in range(fed.num_rounds):
        clients = range(fed.num_clients) if per_round >= fed.num_clients else rng.choice(fed.num_clients, per_round,
                                                                                          replace=False)
        states, sizes = [], []
        for c in clients:
            set_peft_model_state_dict(model, global_state)
            states.append(local_train(model, train, shards[c], steps=t.local_steps, batch_size=t.batch_size, lr=t.lr,
                                      weight_decay=t.weight_decay, rng=rng))
            sizes.append(len(shards[c]))
        global_state = fedavg(states, sizes)
    set_peft_model_state_dict(model, global_state)
    final = accuracy(model, test, n_test, t.eval_batch_size)
    return {"accuracy": final, "wall_s": time.perf_counter() - t0, "rounds": fed.num_rounds}
