"""The in-memory form every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextClassificationData:
    """A text classification dataset, already split into train and test.

    Parameters
    ----------
    name : str
        Registry name of the dataset.
    label_names : tuple of str
        Name of each label; label ``i`` is ``label_names[i]``.
    train_texts : tuple of str
        Training texts.
    train_labels : numpy.ndarray
        ``int64`` label of each training text.
    train_groups : numpy.ndarray
        ``int64`` natural group id of each training text (for example the
        movie a review is about); used for natural partitioning.
    test_texts : tuple of str
        Held-out texts, never given to a client.
    test_labels : numpy.ndarray
        ``int64`` label of each test text.
    train_response_starts, test_response_starts : numpy.ndarray, optional
        For instruction tuning of a causal LM: the character offset in each
        text where the response begins; the loss counts only the tokens from
        there on. Empty (the default) = every token counts.
    group_column : str, optional
        The dataset column the groups come from when each group is a natural
        client (``data.client_column``); "" when groups are only dealt to
        clients (rotten_tomatoes' movies).

    Notes
    -----
    Loaders cache their result per process, so the arrays are made read-only:
    an in-place edit would otherwise leak into every later caller.
    """

    name: str
    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    train_groups: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray
    train_response_starts: np.ndarray = ()
    test_response_starts: np.ndarray = ()
    group_column: str = ""

    def __post_init__(self) -> None:
        num_train = len(self.train_texts)
        if not num_train == len(self.train_labels) == len(self.train_groups):
            raise ValueError("train_texts, train_labels and train_groups differ in length")
        if len(self.test_texts) != len(self.test_labels):
            raise ValueError("test_texts and test_labels differ in length")
        for field, texts in (("train_response_starts", self.train_texts), ("test_response_starts", self.test_texts)):
            if len(getattr(self, field)) not in (0, len(texts)):
                raise ValueError(f"{field} must be empty or have one offset per text")
        for field in ("train_labels", "train_groups", "test_labels", "train_response_starts", "test_response_starts"):
            array = np.array(getattr(self, field), dtype=np.int64)
            array.flags.writeable = False
            object.__setattr__(self, field, array)

    @property
    def num_labels(self) -> int:
        """Number of distinct labels."""
        return len(self.label_names)

    @property
    def majority_baseline(self) -> float:
        """Test accuracy of always predicting the most common training label."""
        return self.majority_baseline_on(0)

    def majority_baseline_on(self, limit: int) -> float:
        """The same on the first ``limit`` test rows (0 = all): the rows a run with
        ``data.max_test_examples = limit`` evaluates on."""
        majority = int(np.argmax(np.bincount(self.train_labels, minlength=self.num_labels)))
        labels = self.test_labels if limit <= 0 else self.test_labels[:limit]
        return float(np.mean(labels == majority))
