"""PNG plots of a training run, drawn with matplotlib when it is installed (``pip install
'cnn_numba[plot]'``); without it ``save_plots`` says so once and writes nothing.

    curves.png        train and validation loss and accuracy per epoch
    filters.png       the first convolution's kernels, one tile per (output, input) channel
    feature_maps.png  one test image and that convolution's output maps for it

Figures are drawn with ``matplotlib.figure.Figure`` rather than pyplot, so nothing here touches
pyplot's global state or needs a display.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from .data import DataLoader
from .nn import Conv2d
from .tensor import no_grad, tensor

MAX_TILES = 64


def first_conv(model) -> Conv2d | None:
    """The first Conv2d that reads the 1-channel input, in module order."""
    return next((m for m in model.modules() if isinstance(m, Conv2d) and m.in_channels == 1), None)


def _grid(fig, tiles, title: str, cmap: str, symmetric: bool) -> None:
    """Draw tiles (a sequence of 2-D arrays) in a near-square grid of subplots, each with its own colour scale."""
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    fig.suptitle(title)
    for i, tile in enumerate(tiles):
        ax = fig.add_subplot(rows, cols, i + 1)
        limit = np.abs(tile).max() or 1.0
        ax.imshow(tile, cmap=cmap, vmin=-limit if symmetric else None, vmax=limit if symmetric else None)
        ax.set_xticks([])
        ax.set_yticks([])


def save_plots(folder, history: list[dict], model, image: np.ndarray, normalize, device: str = "cpu") -> list[Path]:
    """Write the PNGs above into ``folder``; returns their paths ([] without matplotlib).

    history: the per-epoch records of ``train`` (train_loss, train_acc, val_loss, val_acc);
    image: one uint8 (28, 28) image for the feature maps; normalize: its (mean, std).
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        print("cnn_numba: --plots: matplotlib is not installed (pip install matplotlib); no plots written",
              file=sys.stderr)
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    if history:
        fig = Figure(figsize=(10, 4), layout="constrained")
        epochs = [r["epoch"] for r in history]
        for ax, key, label in zip(fig.subplots(1, 2), ("loss", "acc"), ("cross-entropy loss", "accuracy")):
            for part in ("train", "val"):
                values = [r.get(f"{part}_{key}") for r in history]
                if all(v is not None for v in values):
                    ax.plot(epochs, values, marker="o", label=part)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(label)
            ax.legend()
        fig.savefig(folder / "curves.png", dpi=100)
        written.append(folder / "curves.png")

    conv = first_conv(model)
    if conv is None:
        print("cnn_numba: --plots: the model has no Conv2d on its input; no filter plots", file=sys.stderr)
        return written
    w = conv.weight.numpy()  # (C_out, C_in=1, kH, kW)
    fig = Figure(figsize=(6, 6), layout="constrained")
    _grid(fig, list(w.reshape(-1, *w.shape[2:])[:MAX_TILES]), f"first conv filters {w.shape}", "RdBu_r", True)
    fig.savefig(folder / "filters.png", dpi=100)
    written.append(folder / "filters.png")

    x, _ = next(iter(DataLoader(image[None], np.zeros(1, np.int64), 1, shuffle=False, normalize=normalize)))
    with no_grad():
        maps = conv(tensor(x, device=device)).numpy()[0]  # (C_out, H', W')
    fig = Figure(figsize=(8, 6), layout="constrained")
    tiles = [x[0, 0], *maps[:MAX_TILES - 1]]  # the input first; the maps may be smaller
    _grid(fig, tiles, "input, then the first conv's feature maps", "viridis", False)
    fig.savefig(folder / "feature_maps.png", dpi=100)
    written.append(folder / "feature_maps.png")
    return written
