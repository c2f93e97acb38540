"""The image grid of an audit: the victims' originals in the top row, each attack's reconstructions below."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def write_image_grid(path: Path, grid: Mapping[str, Sequence]) -> None:
    """Draw ``grid`` (``"originals"`` first, then one row per attack) as a PNG at ``path``.

    Parameters
    ----------
    path : Path
        The PNG to write.
    grid : mapping of str to array-like
        ``(N, H, W)`` images in [0, 1] per row name; reconstructions are in
        the originals' order (after best matching), so columns line up.
    """
    from matplotlib.figure import Figure

    rows = list(grid.items())
    cols = max(len(images) for _, images in rows)
    fig = Figure(figsize=(0.9 * cols + 1.6, 0.95 * len(rows)), dpi=120, layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (name, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                # Fixed range: a faint reconstruction must look faint, not be stretched to full contrast.
                ax.imshow(np.asarray(images[c]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
