"""02's memory plan (`sdnb.memory`): SD's VAE trains (whole, or its decoder on cached latents), LPIPS is frozen in
fp32, and the step is 02's own (`vae_loss`), run once on fake tensors of the VAE's real architecture."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from sdnb.memory import Choices, Plans, fake_tensors, plan, step_peak
from sdnb.memory.count import to_fake
from sdnb.runtime import pick_device
from sdnb.vae.config import VAEConfig
from sdnb.vae.model import VAEWithPosterior, prepare_for_training, scale_factor, vae_loss


def fake_batch(cfg: VAEConfig, vae: AutoencoderKL, c: Choices) -> Tensor | dict[str, Tensor]:
    """A batch as the loop hands it to the step: patches in [-1, 1], with the cached posterior for decoder-only."""
    images = torch.randn(c.batch_size, 3, c.resolution, c.resolution)
    if not cfg.cache_latents:
        return images
    side = c.resolution // scale_factor(vae)
    mean = torch.randn(c.batch_size, vae.config.latent_channels, side, side)
    return {"images": images, "mean": mean, "std": torch.ones_like(mean)}


def measure(cfg: VAEConfig, config: dict[str, Any], lpips: nn.Module | None):
    """`sdnb.memory.Measure` for 02: (trained parameters, frozen ones, step peak, step peak without gradients)."""
    weights = dict(mse_weight=cfg.mse_weight, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                   kl_weight=cfg.kl_weight)

    def run(c: Choices) -> tuple[list[Tensor], list[Tensor], int, int]:
        with torch.device("meta"):
            vae = prepare_for_training(AutoencoderKL.from_config(config), cfg.trainable, c.gradient_checkpointing)
        mode = fake_tensors()
        to_fake(mode, vae)
        with mode:
            model, batch = VAEWithPosterior(vae), fake_batch(cfg, vae, c)
            trained = [p for p in vae.parameters() if p.requires_grad]
            frozen = [p for p in vae.parameters() if not p.requires_grad] + \
                     (list(lpips.parameters()) if lpips is not None else [])
            peak, peak_no_grads = step_peak(lambda: vae_loss(model, batch, lpips, **weights)["loss"], trained,
                                            c.precision)
        return trained, frozen, peak, peak_no_grads

    return run


def memory_plan(cfg: VAEConfig, vae: AutoencoderKL | None = None, config: dict[str, Any] | None = None,
                lpips: nn.Module | None = None, device: torch.device | str | None = None) -> Plans:
    """The GPU memory 02 needs with `cfg` (weights, gradients, optimizer state, activations at `patch_size`), on the
    device found (`cfg.device`) and, without a CUDA GPU, on a 16 GB T4; with the first change that fits when it does
    not. The architecture comes from `vae` (loaded) or its `config`; `lpips`: the loss network (None: no LPIPS)."""
    config = dict(config or vae.config)
    choices = Choices(cfg.batch_size, cfg.grad_accum, cfg.patch_size, cfg.mixed_precision, cfg.optimizer,
                      cfg.gradient_checkpointing, 0, cfg.ema)
    title = f"SD VAE ({'decoder' if cfg.trainable == 'decoder' else 'encoder and decoder'})"
    device = torch.device(device) if device is not None else pick_device(cfg.device)
    return plan(title, measure(cfg, config, lpips if cfg.lpips_weight > 0 else None), choices, device,
                cfg.mixed_precision, cfg.optimizer)
