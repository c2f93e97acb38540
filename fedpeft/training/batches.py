"""Tokenise a dataset once per process and cut it into padded batches."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.data import TextClassificationData


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids (one int64 array per example, unpadded) and integer labels."""

    ids: tuple[np.ndarray, ...]
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def subset(self, indices) -> "EncodedSplit":
        idx = np.asarray(indices, dtype=np.int64)
        return EncodedSplit(ids=tuple(self.ids[i] for i in idx), labels=self.labels[idx], pad_id=self.pad_id)

    def batch(self, indices, task: str) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to their longest and build the model inputs.

        For a causal LM the labels are the input ids with padding masked
        (-100), so the model's own shifted next-token loss applies.
        """
        seqs = [self.ids[i] for i in indices]
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if task == "causal_lm":
            out["labels"] = torch.from_numpy(np.where(mask == 1, ids, -100))
        else:
            out["labels"] = torch.from_numpy(self.labels[np.asarray(indices)])
        return out


def encode(texts, labels, tokenizer, max_length: int) -> EncodedSplit:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = tuple(np.asarray(x, dtype=np.int64) for x in enc["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedSplit(ids=ids, labels=np.asarray(labels, dtype=np.int64), pad_id=int(pad))


_CACHE: dict[tuple, tuple[EncodedSplit, EncodedSplit]] = {}
_LOCK = threading.Lock()


def encoded_splits(data: TextClassificationData, tokenizer, max_length: int, key: tuple) -> tuple[EncodedSplit, EncodedSplit]:
    """(train, test) encoded once per process for ``key`` (dataset, model, length)."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = (
                encode(data.train_texts, data.train_labels, tokenizer, max_length),
                encode(data.test_texts, data.test_labels, tokenizer, max_length),
            )
        return _CACHE[key]
