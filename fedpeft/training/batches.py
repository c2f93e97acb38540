"""Tokenise a dataset once per process and cut it into padded batches."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.data import TextClassificationData


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids (one int64 array per example, unpadded) and integer labels.

    ``loss_starts`` (causal LM, optional): per example, the first token
    position the next-token loss counts; earlier tokens (an instruction
    prompt) are context only. None = every token counts.
    """

    ids: tuple[np.ndarray, ...]
    labels: np.ndarray
    pad_id: int
    loss_starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def subset(self, indices) -> "EncodedSplit":
        idx = np.asarray(indices, dtype=np.int64)
        starts = None if self.loss_starts is None else self.loss_starts[idx]
        return EncodedSplit(ids=tuple(self.ids[i] for i in idx), labels=self.labels[idx], pad_id=self.pad_id,
                            loss_starts=starts)

    def batch(self, indices, task: str, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Pad the chosen examples to their longest and build the model inputs.

        For a causal LM the labels are the input ids with padding (and the
        tokens before ``loss_starts``) masked (-100), so the model's own
        shifted next-token loss applies. The arrays are built on the host
        and the tensors land on ``device`` (the model's; None = the CPU).
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
            counted = mask == 1
            if self.loss_starts is not None:
                starts = self.loss_starts[np.asarray(indices, dtype=np.int64)]
                counted &= np.arange(width)[None, :] >= starts[:, None]
            out["labels"] = torch.from_numpy(np.where(counted, ids, -100))
        else:
            out["labels"] = torch.from_numpy(self.labels[np.asarray(indices)])
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out


def encode(texts, labels, tokenizer, max_length: int, response_starts=None) -> EncodedSplit:
    """Tokenise ``texts``; ``response_starts`` (character offsets, optional) become token ``loss_starts``."""
    texts = list(texts)
    with_starts = response_starts is not None and len(response_starts) > 0 and bool(np.any(np.asarray(response_starts)))
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=with_starts)
    ids = tuple(np.asarray(x, dtype=np.int64) for x in enc["input_ids"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    starts = _token_starts(enc["offset_mapping"], response_starts) if with_starts else None
    return EncodedSplit(ids=ids, labels=np.asarray(labels, dtype=np.int64), pad_id=int(pad), loss_starts=starts)


def _token_starts(offsets, char_starts) -> np.ndarray:
    """First token of each example that begins at or after its character offset (special tokens skipped)."""
    out = np.empty(len(offsets), dtype=np.int64)
    for row, (spans, char_start) in enumerate(zip(offsets, char_starts)):
        positions = [t for t, (begin, end) in enumerate(spans) if end > begin and begin >= char_start]
        # Truncation can cut the whole response: then count only the last
        # token, so the example still has a finite loss (it teaches little).
        out[row] = positions[0] if positions else max(len(spans) - 1, 0)
    return out


_CACHE: dict[tuple, tuple[EncodedSplit, EncodedSplit]] = {}
_LOCK = threading.Lock()


def encoded_splits(data: TextClassificationData, tokenizer, max_length: int, key: tuple) -> tuple[EncodedSplit, EncodedSplit]:
    """(train, test) encoded once per process for ``key`` (dataset, model, length)."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = (
                encode(data.train_texts, data.train_labels, tokenizer, max_length, data.train_response_starts),
                encode(data.test_texts, data.test_labels, tokenizer, max_length, data.test_response_starts),
            )
        return _CACHE[key]
