"""SD's VAE: loading, reconstruction (batched, and tiled for full-size images), losses and the training step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdnb.patches import to_tensor


def load_vae(model_id: str, subfolder: str = "vae", device: torch.device | str = "cpu") -> AutoencoderKL:
    """An `AutoencoderKL` from a hub id or folder; a folder that is itself a VAE (no `vae/`) also works."""
    local = Path(model_id)
    if subfolder and local.is_dir() and not (local / subfolder).is_dir() and (local / "config.json").is_file():
        subfolder = ""  # a run's final/ folder or any VAE folder
    if local.is_dir() and (local / "final" / "config.json").is_file() and not (local / "config.json").exists():
        local, subfolder = local / "final", ""  # a run folder of 02_vae_finetune
        model_id = str(local)
    vae = AutoencoderKL.from_pretrained(model_id, subfolder=subfolder or None)
    return vae.to(device).eval().requires_grad_(False)


def scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent pixel covers on a side (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 8, sample: bool = False) -> torch.Tensor:
    """Encode and decode (N, 3, H, W) images in [-1, 1]; the posterior mode unless `sample`. Returns CPU float."""
    device, dtype = vae.device, vae.dtype
    out = []
    for chunk in images.split(batch_size):
        posterior = vae.encode(chunk.to(device, dtype)).latent_dist
        latents = posterior.sample() if sample else posterior.mode()
        out.append(vae.decode(latents).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct_full(vae: AutoencoderKL, image: Image.Image | np.ndarray, tile_size: int = 512) -> torch.Tensor:
    """Reconstruct a whole image at full size with diffusers' overlapping, blended tiles (tiles of `tile_size`)."""
    array = np.asarray(image, dtype=np.uint8)
    m = scale_factor(vae)
    h, w = array.shape[0] // m * m, array.shape[1] // m * m  # the VAE needs sides divisible by its factor
    x = to_tensor(array[:h, :w])[None]
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // m
    try:
        return reconstruct(vae, x, batch_size=1)[0]
    finally:
        vae.disable_tiling()
