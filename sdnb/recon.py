"""Reconstructions through a VAE: batched, tiled at full size, per-image metrics and the held-out report."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from sdnb import metrics
from sdnb.patches import to_tensor
from sdnb.vae import scale_factor


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


@torch.no_grad()
def evaluate(vae: AutoencoderKL, patches: torch.Tensor, lpips: nn.Module, batch_size: int = 8) -> dict[str, float]:
    """Held-out reconstruction quality: mean PSNR (dB), SSIM and LPIPS over fixed patches (posterior mode)."""
    was_training = vae.training
    vae.eval()
    recon = reconstruct(vae, patches, batch_size)
    vae.train(was_training)
    return per_image_metrics(recon, patches, lpips, batch_size, mean=True)


@torch.no_grad()
def per_image_metrics(recon: torch.Tensor, originals: torch.Tensor, lpips: nn.Module, batch_size: int = 8,
                      mean: bool = False) -> dict:
    """PSNR, SSIM and LPIPS per image (lists), or their means when `mean`."""
    device = next(lpips.parameters()).device
    values = {
        "psnr": metrics.psnr(recon, originals),
        "ssim": metrics.ssim(recon, originals),
        "lpips": torch.cat([lpips(r.to(device), o.to(device)).cpu()
                            for r, o in zip(recon.split(batch_size), originals.split(batch_size))]),
    }
    return {k: float(v.mean()) if mean else v.tolist() for k, v in values.items()}


def summarize(values: dict[str, list[float]]) -> dict[str, float]:
    """Means of per-image metric lists."""
    return {k: float(np.mean(v)) for k, v in values.items()}


def compare_vaes(vaes: dict[str, AutoencoderKL], images: torch.Tensor, lpips: nn.Module, fid_features: str = "auto",
                 min_fid_images: int = 50, batch_size: int = 8) -> tuple[dict, dict[str, torch.Tensor]]:
    """Reconstruct the same held-out images with each VAE; return (metrics, reconstructions).

    metrics = {name: {"psnr", "ssim", "lpips", "rfid"?}, "n_images": N, "wins": {...}, "labels": {...}}, where
    `wins` is the share of images on which the last VAE beats the first (higher PSNR/SSIM, lower LPIPS).
    rFID is computed only with at least `min_fid_images` images, and labelled with its feature extractor.
    """
    recons = {name: reconstruct(vae, images, batch_size) for name, vae in vaes.items()}
    per_image = {name: per_image_metrics(r, images, lpips, batch_size) for name, r in recons.items()}
    report: dict = {name: summarize(v) for name, v in per_image.items()}
    report["n_images"] = len(images)
    report["models"] = list(vaes)
    report["labels"] = {"lpips": getattr(lpips, "label", "LPIPS"), "psnr": "PSNR (dB, [-1, 1] range)", "ssim": "SSIM"}
    if len(images) >= min_fid_images:
        for name, r in recons.items():
            report[name]["rfid"], report["labels"]["rfid"] = metrics.frechet_distance(images, r, fid_features)
    names = list(vaes)
    if len(names) >= 2:
        first, last = per_image[names[0]], per_image[names[-1]]
        better = {"psnr": np.greater, "ssim": np.greater, "lpips": np.less}
        report["wins"] = {k: float(np.mean(op(last[k], first[k]))) for k, op in better.items()}
    report["per_image"] = per_image
    return report, recons


def compare_full_image(vaes: dict[str, AutoencoderKL], path, tile_size: int = 512) -> tuple[torch.Tensor, dict]:
    """A whole image through each VAE with tiling: (original (1, 3, H, W), {name: reconstruction (1, 3, H, W)})."""
    from sdnb.images import load_rgb

    image = np.asarray(load_rgb(path), dtype=np.uint8)
    recons = {name: reconstruct_full(vae, image, tile_size)[None] for name, vae in vaes.items()}
    h, w = next(iter(recons.values())).shape[-2:]
    return to_tensor(image[:h, :w])[None], recons


def write_metrics(report: dict, path) -> str:
    """Write the held-out report as metrics.json ({"base", "finetuned", "n_patches", ...}); return a printable table."""
    import json
    from pathlib import Path

    out = {k: v for k, v in report.items() if k not in ("per_image", "n_images")}
    out["n_patches"] = report["n_images"]
    out["per_patch"] = report.get("per_image", {})
    Path(path).write_text(json.dumps(out, indent=2))
    names = report["models"]
    keys = [k for k in ("psnr", "ssim", "lpips", "rfid") if k in report[names[0]]]
    lines = [f"held-out patches: {report['n_images']}", f"{'':>10}" + "".join(f"{k:>12}" for k in keys)]
    lines += [f"{n:>10}" + "".join(f"{report[n][k]:>12.4f}" for k in keys) for n in names]
    lines += [f"{k}: {report['labels'][k]}" for k in keys]
    if "wins" in report:
        lines.append("fine-tuned better on: " + ", ".join(f"{k} {v:.0%}" for k, v in report["wins"].items()))
    return "\n".join(lines)
