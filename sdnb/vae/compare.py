"""The VAE comparison that 02 and 04 both run: the same held-out images through base, fine-tuned (and control)
VAEs, by eye (reconstructions, whole images) and in numbers (one `metrics.json` schema, the "vae" section).

Every number is an entry `{"value", "ci95": [low, high], "n"}` (`sdnb.stats`): the 95% interval is a seeded
percentile bootstrap over the held-out images (paired: an image and its reconstructions are resampled together),
and `n` is the number of images it rests on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from sdnb import metrics
from sdnb.data.images import find_images, load_rgb, to_tensor
from sdnb.models import load_vae
from sdnb.stats import HIGHER_IS_BETTER, fid_entry, mean_entry, text_table
from sdnb.vae.control import control_run, verdict
from sdnb.vae.data import held_out_patches
from sdnb.vae.model import reconstruct, scale_factor
from sdnb.vae.tiling import decode_tiled, encode_tiled


def held_out_images(image_dir: str | Path, patch_size: int, n: int, seed: int = 0,
                    cache_dir: str | Path | None = None, min_foreground: float = 0.0,
                    foreground_threshold: float = 0.1) -> tuple[torch.Tensor, str]:
    """The fixed held-out set of a folder (see `held_out_patches`): (N, 3, H, W) in [-1, 1] and a description."""
    paths = [r.path for r in find_images(image_dir, "image_dir")]
    images, description = held_out_patches(paths, patch_size, n, seed, cache_dir, min_foreground, foreground_threshold)
    return images, f"{description} in {image_dir}"


def load_vaes(base: str, finetuned: str, control: str = "", device: torch.device | str = "cpu",
              config: str = "") -> dict[str, AutoencoderKL]:
    """{'base', 'finetuned'[, 'control']}: hub ids, pipeline folders, VAE folders, run folders of 02 or single files
    (their configuration from `config`, see `sdnb.models`); control 'auto' = the control run beside a 02 run, if any."""
    control = control_run(finetuned, control)
    refs = {"base": ("base_vae", base), "finetuned": ("finetuned_vae", finetuned), "control": ("control_vae", control)}
    vaes = {}
    for name, (parameter, ref) in refs.items():
        if not ref:
            continue
        try:
            vaes[name] = load_vae(ref, "vae", device, parameter, config)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{parameter}={ref!r} could not be loaded as a VAE: {err}") from err
    return vaes


@dataclass
class VAEComparison:
    """What `compare_vaes` returns: the held-out images, each VAE's reconstructions and the metrics (JSON-able)."""

    originals: torch.Tensor
    recons: dict[str, torch.Tensor]
    metrics: dict = field(default_factory=dict)

    def table(self) -> str:
        """A printable table: every metric with its interval and n."""
        return text_table(self.metrics)


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """Which VAE is compared with which: each against the base, and fine-tuned against the control."""
    pairs = [(k, names[0]) for k in names[1:]]
    return pairs + ([(names[1], names[2])] if len(names) >= 3 else [])


def _paired(a: Mapping[str, list], b: Mapping[str, list], n_bootstrap: int, seed: int) -> tuple[dict, dict]:
    """Two VAEs' per-image metrics on the same images: the share of images on which `a` is strictly better (with the
    share of ties), and the mean paired difference a - b, each with its bootstrap interval."""
    wins, difference = {}, {}
    for m in ("psnr", "ssim", "lpips"):
        va, vb = np.asarray(a[m]), np.asarray(b[m])
        better = va > vb if HIGHER_IS_BETTER[m] else va < vb
        wins[m] = {**mean_entry(better.astype(float), n_bootstrap, seed), "ties": float(np.mean(va == vb))}
        difference[m] = mean_entry(va - vb, n_bootstrap, seed)
    return wins, difference


def compare_vaes(vaes: Mapping[str, AutoencoderKL], images: torch.Tensor, lpips: nn.Module,
                 features: str | nn.Module = "auto", n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 8,
                 description: str = "") -> VAEComparison:
    """Reconstruct the held-out images with each VAE (the first is the base) and measure them.

    metrics = {"models": {name: {psnr, ssim, lpips, rfid}}, "wins": {"A vs B": {metric: share of images on
    which A is strictly better}}, "difference": {"A vs B": {metric: mean of A's minus B's per-image value}},
    "change": {"A vs B": the same metrics between A's and B's reconstructions (identical models: PSNR =
    metrics.PSNR_CAP, LPIPS 0, rFID 0)}, "verdict": in words, does the second (fine-tuned) beat the first (base) and
    the third (control), "labels", "n_images", "description"}. Pairs: each against the base, fine-tuned vs control.
    """
    names = list(vaes)
    recons = {k: reconstruct(vae, images, batch_size) for k, vae in vaes.items()}
    per_image = {k: metrics.per_image_metrics(r, images, lpips, batch_size) for k, r in recons.items()}
    extractor, feature_label = metrics.feature_extractor(features, next(lpips.parameters()).device)
    feats = {k: metrics.image_features(r, extractor) for k, r in recons.items()}
    feats_orig = metrics.image_features(images, extractor)
    out: dict = {"description": description, "n_images": len(images), "models": {}, "wins": {}, "difference": {},
                 "change": {}, "labels": {"psnr": f"PSNR (dB, [-1, 1] range; identical = {metrics.PSNR_CAP:g})",
                                           "ssim": "SSIM", "lpips": getattr(lpips, "label", "LPIPS"),
                                           "rfid": f"rFID ({feature_label})"}}
    if len(images) < 50:
        out["labels"]["rfid_note"] = (f"rFID on {len(images)} images is dominated by sampling noise and grows as n "
                                      "shrinks: compare rFIDs only at equal n, and trust the per-image metrics more.")
    for k in names:
        row = {m: mean_entry(per_image[k][m], n_bootstrap, seed) for m in ("psnr", "ssim", "lpips")}
        row["rfid"] = fid_entry(feats_orig, feats[k], paired=True, n_bootstrap=n_bootstrap, seed=seed)
        out["models"][k] = row
    for a, b in _pairs(names):
        out["wins"][f"{a} vs {b}"], out["difference"][f"{a} vs {b}"] = _paired(per_image[a], per_image[b],
                                                                              n_bootstrap, seed)
        change = {m: mean_entry(v, n_bootstrap, seed) for m, v in metrics.per_image_metrics(recons[a], recons[b], lpips,
                                                                                    batch_size).items()}
        change["rfid"] = fid_entry(feats[b], feats[a], paired=True, n_bootstrap=n_bootstrap, seed=seed)
        out["change"][f"{a} vs {b}"] = change
    out["verdict"] = verdict(out, names)
    out["per_image"] = per_image
    return VAEComparison(images, recons, out)


@torch.no_grad()
def reconstruct_image(vae: AutoencoderKL, image: Image.Image | np.ndarray | torch.Tensor, tile_size: int | None = None,
                      progress: bool = True) -> torch.Tensor:
    """Reconstruct one whole image (the posterior mode) at full size: (3, H, W) in [-1, 1] on the CPU, H and W cut
    down to what the VAE's down-sampling factor divides. `image` is RGB uint8 (PIL or HxWx3) or (3, H, W) in [-1, 1].

    `tile_size` None: in one pass. An int: seamless tiles of that side (`sdnb.vae.tiling`: whole-image GroupNorm
    statistics, exact halos), equal to the one-pass result up to rounding, for images too large for one pass."""
    x = image.float() if isinstance(image, torch.Tensor) else to_tensor(np.asarray(image, dtype=np.uint8))
    m = scale_factor(vae)
    x = x[None, :, : x.shape[1] // m * m, : x.shape[2] // m * m]
    if tile_size is None:
        return reconstruct(vae, x, batch_size=1)[0]
    moments = encode_tiled(vae, x, tile_size, progress)
    latents = moments[:, : moments.shape[1] // 2]  # the posterior mode (its mean)
    return decode_tiled(vae, latents, tile_size, progress)[0].float().clamp(-1, 1).cpu()


def whole_images(vaes: Mapping[str, AutoencoderKL], images: str | Path | Sequence[str | Path], n: int = 0,
                 tile_size: int | None = 512) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    """Whole held-out images at full size through each VAE, in seamless tiles of `tile_size` (None: one pass; see
    `reconstruct_image`): `images` is a folder or a list of files, the first `n` are used (0 = all). Returns [(file name, original (3, H, W), {vae: reconstruction (3, H, W)})],
    H and W cut down to what the VAEs' down-sampling factor divides."""
    paths = [r.path for r in find_images(images, "image_dir")] if isinstance(images, (str, Path)) else list(images)
    out = []
    for path in paths[: n or None]:
        image = np.asarray(load_rgb(path), dtype=np.uint8)
        recons = {name: reconstruct_image(vae, image, tile_size) for name, vae in vaes.items()}
        h, w = next(iter(recons.values())).shape[-2:]
        out.append((Path(path).name, to_tensor(image[:h, :w]), recons))
    return out
