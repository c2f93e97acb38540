"""Tokenised examples, local training steps and evaluation, shared by clients and server."""

from fedpeft.training.batches import EncodedSplit, encode, encoded_splits
from fedpeft.training.loop import evaluate, train_steps

__all__ = ["EncodedSplit", "encode", "encoded_splits", "evaluate", "train_steps"]
