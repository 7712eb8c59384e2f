"""02's and 04's pictures: the training patches as the model sees them, the field of view they come from, and whole
images large enough to see vessels, with a zoomed crop."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy import ndimage

from sdnb.data.images import to_array
from sdnb.vae.config import VAEConfig
from sdnb.vae.data import PatchDataset, VAEData
from sdnb.vae.foreground import Positions, fov_mask
from sdnb.viz import patch_sheet, reconstruction_grid


def preview_patches(cfg: VAEConfig, data: VAEData, n: int = 8) -> plt.Figure:
    """`n` random training patches as the model sees them (the recipe's flips and turns included)."""
    shown = PatchDataset(data.train_images, cfg.patch_size, n, seed=cfg.seed, hflip=cfg.hflip, vflip=cfg.vflip,
                         rot90=cfg.rot90, min_foreground=cfg.min_foreground,
                         foreground_threshold=cfg.foreground_threshold)
    return patch_sheet([shown[i] for i in range(n)])


def preview_mask(cfg: VAEConfig, data: VAEData, n_images: int = 3, n_patches: int = 24) -> plt.Figure:
    """The first training images with their field of view (background dimmed, outline in cyan) and where the first
    `n_patches` training patches of each come from (yellow boxes)."""
    ds = PatchDataset(data.train_images, cfg.patch_size, n_patches, seed=cfg.seed, hflip=False,
                      min_foreground=cfg.min_foreground, foreground_threshold=cfg.foreground_threshold)
    places = [ds.place(ds.rng(i)) for i in range(n_patches)]
    k = min(n_images, len(data.train_images))
    fig, axes = plt.subplots(1, k, figsize=(5 * k, 5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        image = np.asarray(data.train_images[i])
        c = max(1, min(image.shape[:2]) // 512)  # shown at ~512 px
        small = np.ascontiguousarray(image[::c, ::c])
        mask = fov_mask(small, cfg.foreground_threshold)
        ax.imshow(np.where(mask[..., None], small, small // 3))
        ax.contour(mask, levels=[0.5], colors="cyan", linewidths=1)
        for j, y, x in places:
            if j == i:
                ax.add_patch(plt.Rectangle((x / c, y / c), cfg.patch_size / c, cfg.patch_size / c, fill=False,
                                           color="yellow", lw=1))
        ax.set_title(f"{data.train_images.paths[i].name}: {mask.mean():.0%} field of view", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"training patches are >= {cfg.min_foreground:.0%} field of view (min_foreground; 0 = any patch)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def detail_crop(image: torch.Tensor, size: int = 256) -> tuple[int, int]:
    """Top-left (y, x) of the `size` crop of a (3, H, W) image in [-1, 1] with the most fine detail (e.g. vessels):
    the largest high-pass energy among crops wholly inside the field of view (any crop if none is)."""
    array = to_array(image)
    h, w = array.shape[:2]
    size = min(size, h, w)
    lum = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    detail = np.abs(lum - ndimage.gaussian_filter(lum, 3))
    pos = Positions(array, 8 * (size // 8), 0.999) if size >= 8 else None
    best, best_yx = -1.0, (0, 0)
    for y in range(0, h - size + 1, max(1, size // 4)):
        for x in range(0, w - size + 1, max(1, size // 4)):
            if pos is not None and pos.n_candidates and pos.share(y, x) < 0.999:
                continue
            energy = float(detail[y:y + size, x:x + size].mean())
            if energy > best:
                best, best_yx = energy, (y, x)
    return best_yx


def whole_image_figures(original: torch.Tensor, recons: Mapping[str, torch.Tensor], crop: int = 256,
                        panel: float = 10.0) -> tuple[plt.Figure, plt.Figure]:
    """A whole image (3, H, W) and its reconstructions, large (`panel` inches per image: >= 1024 px at dpi 150), with
    error maps; and the same zoomed crop of each (the most detailed `crop` x `crop` region, e.g. vessels)."""
    full = reconstruction_grid(original[None], {k: v[None] for k, v in recons.items()})
    n = 1 + 2 * len(recons)
    full.set_size_inches(panel * n, panel * original.shape[1] / original.shape[2] + 1)
    y, x = detail_crop(original, crop)
    cut = lambda t: t[None, :, y:y + crop, x:x + crop]  # noqa: E731
    zoom = reconstruction_grid(cut(original), {k: cut(v) for k, v in recons.items()})
    zoom.set_size_inches(4 * n, 4.6)
    zoom.suptitle(f"the same {crop}x{crop} crop (top-left y={y}, x={x}), zoomed", fontsize=10)
    return full, zoom
