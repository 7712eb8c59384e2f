"""04_compare, the VAE side: the same held-out images through base, fine-tuned (and control) VAEs, in numbers.

Every number is stored as an entry `{"value", "ci95": [low, high], "n"}`: the 95% interval is a seeded
percentile bootstrap over the held-out images (paired: an image and its reconstructions are resampled
together), and `n` is the number of images it rests on. The SD side is in `sdnb.compare_sd`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from sdnb import metrics
from sdnb.patches import DecodedImages, fixed_patches, list_images, to_tensor
from sdnb.recon import per_image_metrics, reconstruct

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "rfid": False, "fid": False, "kid": False,
                    "clip": True}


def entry(value: float, ci95: tuple[float, float] | None, n: int, **extra) -> dict:
    """One reported number with its 95% interval and sample size."""
    out = {"value": float(value), "ci95": None if ci95 is None else [float(ci95[0]), float(ci95[1])], "n": int(n)}
    return {**out, **extra}


def mean_entry(values, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Mean of per-image values, bootstrap interval, n."""
    values = np.asarray(values, dtype=float)
    return entry(values.mean(), metrics.mean_ci(values, n_bootstrap, seed) if n_bootstrap else None, len(values))


def feature_extractor(features: str | nn.Module = "auto", device: torch.device | str = "cpu") -> tuple[nn.Module, str]:
    """The FID network (by name, loaded once per process; see `metrics.fid_feature_extractor`) or a given module."""
    if isinstance(features, nn.Module):
        return features, getattr(features, "label", type(features).__name__)
    return metrics.cached_feature_extractor(features, device)


def fid_entry(real: torch.Tensor, fake: torch.Tensor, paired: bool, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """FID between two feature sets with a bias-corrected bootstrap interval (paired: rows resampled together)."""
    value = metrics.fid_from_features(real, fake)
    stat = metrics.fid_resampler(real, fake)
    if paired:
        ci = metrics.bootstrap_ci(lambda i: stat(i, i), (len(real),), n_bootstrap, seed, bias_correct=True) if n_bootstrap else None
        return entry(value, non_negative(ci), len(real))
    ci = metrics.bootstrap_ci(stat, (len(real), len(fake)), n_bootstrap, seed, bias_correct=True) if n_bootstrap else None
    return entry(value, non_negative(ci), len(fake), n_ref=len(real))


def non_negative(ci: tuple[float, float] | None) -> tuple[float, float] | None:
    """A bias-corrected interval of a non-negative quantity (FID, KL) clipped at 0."""
    return None if ci is None else (max(ci[0], 0.0), max(ci[1], 0.0))


def held_out_images(image_dir: str | Path, patch_size: int, n: int, seed: int = 0,
                    cache_dir: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """The fixed held-out set: whole images when all share one size no larger than `patch_size`, else `n` seeded
    patches (images smaller than a patch are padded by reflection). Returns (N, 3, H, W) in [-1, 1] and a description."""
    paths = list_images(image_dir, "image_dir")
    sizes = set()
    for p in paths:
        with Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) == 1 and max(next(iter(sizes))) <= patch_size:
        w, h = next(iter(sizes))
        w, h = w // 8 * 8, h // 8 * 8  # the VAE needs sides divisible by 8
        from sdnb.images import load_rgb

        images = torch.stack([to_tensor(np.asarray(load_rgb(p))[:h, :w]) for p in paths[:n]])
        return images, f"{len(images)} whole held-out images of {w}x{h} from {image_dir}"
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="sdnb-heldout-"))
    images = fixed_patches(DecodedImages(paths, cache, min_side=patch_size), patch_size, n=n, seed=seed)
    return images, f"{n} fixed {patch_size}x{patch_size} patches (seed {seed}) from {len(paths)} held-out images in {image_dir}"


def load_vaes(base: str, finetuned: str, control: str = "", device: torch.device | str = "cpu") -> dict[str, AutoencoderKL]:
    """{'base', 'finetuned'[, 'control']}: hub ids, pipeline folders, VAE folders or run folders of 02."""
    from sdnb.vae import load_vae

    refs = {"base": ("base_vae", base), "finetuned": ("finetuned_vae", finetuned), "control": ("control_vae", control)}
    vaes = {}
    for name, (parameter, ref) in refs.items():
        if not ref:
            continue
        try:
            vaes[name] = load_vae(ref, "vae", device)
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
        from sdnb.report import text_table

        return text_table(self.metrics)


def _pairs(names: list[str]) -> list[tuple[str, str]]:
    """Which VAE is compared with which: each against the base, and fine-tuned against the control."""
    pairs = [(k, names[0]) for k in names[1:]]
    return pairs + ([(names[1], names[2])] if len(names) >= 3 else [])


def compare_vaes(vaes: Mapping[str, AutoencoderKL], images: torch.Tensor, lpips: nn.Module,
                 features: str | nn.Module = "auto", n_bootstrap: int = 1000, seed: int = 0, batch_size: int = 8,
                 description: str = "") -> VAEComparison:
    """Reconstruct the held-out images with each VAE (the first is the base) and measure them.

    metrics = {"models": {name: {psnr, ssim, lpips, rfid}}, "wins": {"A vs B": {metric: share of images on
    which A is strictly better}}, "change": {"A vs B": the same metrics between A's and B's reconstructions
    (identical models: PSNR = metrics.PSNR_CAP, LPIPS 0, rFID 0)}, "labels", "n_images", "description"}.
    """
    names = list(vaes)
    recons = {k: reconstruct(vae, images, batch_size) for k, vae in vaes.items()}
    per_image = {k: per_image_metrics(r, images, lpips, batch_size) for k, r in recons.items()}
    extractor, feature_label = feature_extractor(features, next(lpips.parameters()).device)
    feats = {k: metrics.image_features(r, extractor) for k, r in recons.items()}
    feats_orig = metrics.image_features(images, extractor)
    out: dict = {"description": description, "n_images": len(images), "models": {}, "wins": {}, "change": {},
                 "labels": {"psnr": f"PSNR (dB, [-1, 1] range; identical = {metrics.PSNR_CAP:g})", "ssim": "SSIM",
                            "lpips": getattr(lpips, "label", "LPIPS"), "rfid": f"rFID ({feature_label})"}}
    if len(images) < 50:
        out["labels"]["rfid_note"] = (f"rFID on {len(images)} images is dominated by sampling noise and grows as n "
                                      "shrinks: compare rFIDs only at equal n, and trust the per-image metrics more.")
    for k in names:
        row = {m: mean_entry(per_image[k][m], n_bootstrap, seed) for m in ("psnr", "ssim", "lpips")}
        row["rfid"] = fid_entry(feats_orig, feats[k], paired=True, n_bootstrap=n_bootstrap, seed=seed)
        out["models"][k] = row
    for a, b in _pairs(names):
        wins = {}
        for m in ("psnr", "ssim", "lpips"):
            va, vb = np.asarray(per_image[a][m]), np.asarray(per_image[b][m])
            better = va > vb if HIGHER_IS_BETTER[m] else va < vb
            wins[m] = {**mean_entry(better.astype(float), n_bootstrap, seed), "ties": float(np.mean(va == vb))}
        out["wins"][f"{a} vs {b}"] = wins
        change = {m: mean_entry(v, n_bootstrap, seed) for m, v in per_image_metrics(recons[a], recons[b], lpips,
                                                                                    batch_size).items()}
        change["rfid"] = fid_entry(feats[b], feats[a], paired=True, n_bootstrap=n_bootstrap, seed=seed)
        out["change"][f"{a} vs {b}"] = change
    out["per_image"] = per_image
    return VAEComparison(images, recons, out)


def full_images(vaes: Mapping[str, AutoencoderKL], image_dir: str | Path, n: int = 1,
                tile_size: int = 512) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    """The first `n` held-out images at full size through each VAE (blended tiles): [(name, original, {vae: recon})]."""
    from sdnb.recon import compare_full_image

    out = []
    for path in list_images(image_dir, "image_dir")[:n]:
        original, recons = compare_full_image(dict(vaes), path, tile_size)
        out.append((Path(path).name, original[0], {k: v[0] for k, v in recons.items()}))
    return out


def write_metrics(path: str | Path, **sections: dict | None) -> Path:
    """run_dir/metrics.json: {"vae": ..., "sd": ...} (sections left out when None)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in sections.items() if v is not None}
    path.write_text(json.dumps(data, indent=2))
    return path
