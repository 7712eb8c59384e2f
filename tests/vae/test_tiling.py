"""Seamless tiles: a tiled reconstruction equals the one-pass reconstruction, with no error along the tile borders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from sdnb import metrics
from sdnb.data.images import to_tensor
from sdnb.vae import reconstruct_image
from sdnb.vae.model import scale_factor
from sdnb.vae.tiling import Map, Tiler


def border_interior_ratio(error: torch.Tensor, vae: AutoencoderKL, tile_size: int, band: int = 3) -> float:
    """Mean error within `band` px of the image-resolution tile borders / mean error elsewhere (HxW error map)."""
    h, w = error.shape
    tiles = Tiler("cpu", torch.float32, tile_size, vae.config.block_out_channels[0]).tiles(
        Map(vae.config.block_out_channels[0], h, w, None))
    near = torch.zeros(h, w, dtype=torch.bool)
    for y0, y1, x0, x1 in tiles:
        for y in {y0, y1} - {0, h}:
            near[max(0, y - band):y + band] = True
        for x in {x0, x1} - {0, w}:
            near[:, max(0, x - band):x + band] = True
    assert near.any() and (~near).any(), "the image must span several tiles"
    return float(error[near].mean() / error[~near].mean())


def diffusers_tiled(vae: AutoencoderKL, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """diffusers' own tiling (per-tile GroupNorm, blended overlaps), for contrast (printed, not asserted)."""
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_size, tile_size // scale_factor(vae)
    try:
        with torch.no_grad():
            out = vae.decode(vae.encode(x[None]).latent_dist.mode()).sample[0].clamp(-1, 1)
    finally:
        vae.disable_tiling()
    return out[:, :x.shape[1], :x.shape[2]]  # its blending can overshoot sizes that are no tile multiple


def check(vae: AutoencoderKL, image: np.ndarray, tile_size: int, label: str) -> None:
    vae.eval()
    untiled = reconstruct_image(vae, image)
    tiled = reconstruct_image(vae, image, tile_size, progress=False)
    original = to_tensor(image)[:, :tiled.shape[1], :tiled.shape[2]]
    assert tiled.shape == untiled.shape == original.shape
    p_untiled, p_tiled = (float(metrics.psnr(r[None], original[None])) for r in (untiled, tiled))
    err = {k: (r - original).abs().mean(0) for k, r in (("untiled", untiled), ("tiled", tiled))}
    ratios = {k: border_interior_ratio(e, vae, tile_size) for k, e in err.items()}
    theirs = diffusers_tiled(vae, original, tile_size)
    max_diff = float((tiled - untiled).abs().max())
    print(f"\n{label}: PSNR untiled {p_untiled:.3f} dB, tiled {p_tiled:.3f} dB "
          f"(diffusers' tiles {float(metrics.psnr(theirs[None], original[None])):.3f} dB); vs untiled: tiled max |diff| "
          f"{max_diff:.2e}, PSNR {float(metrics.psnr(tiled[None], untiled[None])):.1f} dB (capped), diffusers' tiles "
          f"PSNR {float(metrics.psnr(theirs[None], untiled[None])):.1f} dB; border/interior error ratio: tiled "
          f"{ratios['tiled']:.3f}, untiled {ratios['untiled']:.3f}")
    assert abs(p_tiled - p_untiled) < 0.5
    assert max_diff < 1e-3  # rounding only (measured ~1e-5)
    assert ratios["tiled"] <= ratios["untiled"] + 0.01  # no seams: the borders are no worse than in one pass


def test_tiled_equals_untiled_on_the_tiny_vae(tiny_assets, one_thread):
    vae = AutoencoderKL.from_pretrained(tiny_assets.sd / "vae")
    path = sorted(tiny_assets.fundus_val.glob("*.png"))[0]
    image = np.asarray(Image.open(path).convert("RGB"))[100:292, 60:316]  # 192x256
    check(vae, image, 64, "tiny VAE, 192x256, tiles of 64")


def test_tiled_equals_untiled_on_an_sd_shaped_vae(tiny_assets, one_thread):
    torch.manual_seed(0)  # random weights, SD v1's layout (4 levels, 2 resnets each, mid-block attention)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32, 64, 128, 128), layers_per_block=2, norm_num_groups=32)
    path = sorted(tiny_assets.fundus_val.glob("*.png"))[1]
    image = np.asarray(Image.open(path).convert("RGB"))[:112, 200:368]
    check(vae, image, 56, "SD-shaped VAE (random), 112x168, tiles of 56")


def test_a_tile_larger_than_the_image_is_one_pass(tiny_assets):
    vae = AutoencoderKL.from_pretrained(tiny_assets.sd / "vae").eval()
    image = torch.rand(3, 40, 48) * 2 - 1
    assert torch.allclose(reconstruct_image(vae, image, 512, progress=False), reconstruct_image(vae, image), atol=1e-4)


def test_unsupported_blocks_are_named(tiny_assets):
    vae = AutoencoderKL(down_block_types=("AttnDownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        block_out_channels=(32,), norm_num_groups=32).eval()
    with pytest.raises(NotImplementedError, match="AttnDownEncoderBlock2D.*tile_size=None"):
        reconstruct_image(vae, torch.zeros(3, 16, 16), 8, progress=False)
