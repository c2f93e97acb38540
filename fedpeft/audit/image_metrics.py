"""Image reconstruction quality: PSNR, SSIM and best matching for batches.

A batch attack returns its reconstructions in no particular order, so each
reconstruction is paired with the original it resembles most (Hungarian
assignment on PSNR, ``scipy.optimize.linear_sum_assignment``) before scoring,
the convention of breaching and the Inverting Gradients paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def psnr(reconstruction, original, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image pair (leading axis = images).

    Identical images would give infinity; the MSE is floored at 1e-10 (100 dB
    for unit range) so means and intervals stay finite.
    """
    rec, org = _np(reconstruction), _np(original)
    mse = ((rec - org) ** 2).reshape(len(rec), -1).mean(axis=1)
    return 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-10))


def ssim(reconstruction, original, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity of each image pair (torchmetrics, Gaussian window).

    The window is the standard 11x11 (sigma 1.5), shrunk to the largest odd
    size that fits tiny images such as the 8x8 digits.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    rec = torch.as_tensor(_np(reconstruction), dtype=torch.float32)
    org = torch.as_tensor(_np(original), dtype=torch.float32)
    side = min(rec.shape[-2:])
    kernel = min(11, side if side % 2 else side - 1)
    values = structural_similarity_index_measure(
        rec, org, data_range=data_range, kernel_size=kernel, sigma=1.5 * kernel / 11, reduction="none"
    )
    return values.numpy().astype(np.float64)


def best_matching(reconstructions, originals) -> np.ndarray:
    """``perm`` such that ``reconstructions[perm[i]]`` is paired with ``originals[i]``.

    Maximises the summed PSNR over one-to-one pairings (Hungarian algorithm).
    """
    rec, org = _np(reconstructions), _np(originals)
    if len(rec) != len(org):
        raise ValueError(f"{len(rec)} reconstructions for {len(org)} originals")
    score = np.stack([psnr(np.repeat(rec[i : i + 1], len(org), axis=0), org) for i in range(len(rec))])
    rows, cols = linear_sum_assignment(score, maximize=True)  # rows: reconstructions, cols: originals
    perm = np.empty(len(org), dtype=np.int64)
    perm[cols] = rows
    return perm


@dataclass(frozen=True)
class ImageScores:
    """PSNR and SSIM of each original against its matched reconstruction."""

    psnr: np.ndarray
    ssim: np.ndarray


def score_batch(reconstructions, originals, data_range: float = 1.0) -> ImageScores:
    """Score a batch after best matching; one PSNR and one SSIM per original image."""
    rec = _np(reconstructions)[best_matching(reconstructions, originals)]
    org = _np(originals)
    return ImageScores(psnr=psnr(rec, org, data_range), ssim=ssim(rec, org, data_range))


def score_prior(prior_image, originals, data_range: float = 1.0) -> ImageScores:
    """The prior-only baseline: every original compared with one guess (e.g. the public mean image)."""
    org = _np(originals)
    guess = np.broadcast_to(_np(prior_image), org.shape).copy()
    return ImageScores(psnr=psnr(guess, org, data_range), ssim=ssim(guess, org, data_range))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
