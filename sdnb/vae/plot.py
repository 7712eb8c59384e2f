"""02's pictures: the training patches as the model sees them."""

from __future__ import annotations

import matplotlib.pyplot as plt

from sdnb.vae.config import VAEConfig
from sdnb.vae.data import PatchDataset, VAEData
from sdnb.viz import patch_sheet


def preview_patches(cfg: VAEConfig, data: VAEData, n: int = 8) -> plt.Figure:
    """`n` random training patches as the model sees them (the recipe's flips and turns included)."""
    shown = PatchDataset(data.train_images, cfg.patch_size, n, seed=cfg.seed, hflip=cfg.hflip, vflip=cfg.vflip,
                         rot90=cfg.rot90)
    return patch_sheet([shown[i] for i in range(n)])
