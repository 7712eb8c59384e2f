"""Pictures: contact sheets, side-by-side reconstruction grids with error maps, saved under run_dir/grids."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from sdnb.data.images import load_rgb, to_array


def save(fig: plt.Figure, path: str | Path, dpi: int = 100, close: bool = False) -> Path:
    """Save a figure as PNG (parents created) and return the path; `close` frees it (scripts, loops)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    if close:
        plt.close(fig)
    return path


def contact_sheet(paths: Sequence[str | Path], captions: Sequence[str] | None = None, ncols: int = 6,
                  thumb: int = 192, max_images: int = 36) -> plt.Figure:
    """Thumbnails of image files with their names (or captions) under each, aspect ratios kept."""
    paths = list(paths)[:max_images]
    nrows = max(1, -(-len(paths) // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 2.4, nrows * 2.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, path) in enumerate(zip(axes.flat, paths)):
        image = load_rgb(path)
        image.thumbnail((thumb, thumb))
        ax.imshow(image)
        label = captions[i] if captions is not None else Path(path).name
        ax.set_title(wrap(label, 28), fontsize=7)
    fig.tight_layout()
    return fig


def wrap(text: str, width: int, lines: int = 3) -> str:
    """`text` wrapped to `width` characters, at most `lines` lines (' ...' marks a cut)."""
    out = textwrap.wrap(text, width) or [""]
    return "\n".join(out[:lines]) + (" ..." if len(out) > lines else "")


def error_map(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean absolute difference over channels, in [0, 1] units of the image range (HxW)."""
    return (a.float() - b.float()).abs().mean(0).div(2).cpu().numpy()


def reconstruction_grid(originals: torch.Tensor, reconstructions: Mapping[str, torch.Tensor],
                        errors: bool = True, vmax: float | None = None) -> plt.Figure:
    """Rows of patches: original | each reconstruction | |reconstruction - original| for each, one colour scale.

    All tensors are (N, 3, H, W) in [-1, 1]. The error maps share `vmax` (default: the 99th percentile
    over all of them), so a darker map really means a smaller error.
    """
    names = list(reconstructions)
    maps = {k: [error_map(r, o) for r, o in zip(reconstructions[k], originals)] for k in names} if errors else {}
    if errors and vmax is None:
        vmax = float(np.percentile(np.concatenate([m.ravel() for ms in maps.values() for m in ms]), 99)) or 1e-3
    cols = ["original", *names, *([f"|{k} - original|" for k in names] if errors else [])]
    n = len(originals)
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for r in range(n):
        tiles = [to_array(originals[r]), *[to_array(reconstructions[k][r]) for k in names]]
        for c, tile in enumerate(tiles):
            axes[r, c].imshow(tile)
        for j, k in enumerate(names):
            im = axes[r, 1 + len(names) + j].imshow(maps[k][r], cmap="inferno", vmin=0, vmax=vmax) if errors else None
        for c in range(len(cols)):
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=9)
    if errors:
        fig.colorbar(im, ax=axes, shrink=0.6, label="mean |error| (share of the intensity range)")
    return fig


def side_by_side(images: Mapping[str, Image.Image | np.ndarray], size: float = 4.0) -> plt.Figure:
    """Whole images next to each other with titles (e.g. a full held-out image before vs after)."""
    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size), squeeze=False)
    for ax, (title, image) in zip(axes.flat, images.items()):
        ax.imshow(to_array(image) if isinstance(image, torch.Tensor) else image)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    return fig


def patch_sheet(patches: Sequence[torch.Tensor], ncols: int = 8, size: float = 1.6) -> plt.Figure:
    """A row (or rows) of patches in [-1, 1], as the model sees them."""
    nrows = -(-len(patches) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, patch in zip(axes.flat, patches):
        ax.imshow(to_array(patch))
    fig.tight_layout()
    return fig


def image_grid(rows: Sequence[Sequence[torch.Tensor]], col_titles: Sequence[str], row_titles: Sequence[str],
               title: str = "", size: float = 2.0) -> plt.Figure:
    """A grid of images in [-1, 1] (rows of equal length) with column and row titles."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(to_array(image))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0 and row_titles[r]:
                ax.set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
