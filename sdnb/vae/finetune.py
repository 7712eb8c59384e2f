"""Fine-tuning SD's VAE through the shared loop: the step, the held-out evaluation during training, the final
weights; and what `python -m sdnb.train config.json` runs for a 02 config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from sdnb import metrics
from sdnb.metrics import LPIPS
from sdnb.models import load_vae
from sdnb.train import Trainer, TrainResult
from sdnb.train.batches import items_used
from sdnb.train.trackers import log_images
from sdnb.vae.config import VAEConfig
from sdnb.vae.control import control_config, control_data
from sdnb.vae.data import DecodedImages, PatchDataset, PatchLatents, VAEData, prepare_data
from sdnb.vae.memory import memory_plan
from sdnb.vae.model import VAEWithPosterior, prepare_for_training, reconstruct, vae_loss


@torch.no_grad()
def held_out_metrics(vae: AutoencoderKL, patches: torch.Tensor, lpips: nn.Module, batch_size: int = 8) -> dict[str, float]:
    """Held-out reconstruction quality during training: mean PSNR (dB), SSIM and LPIPS over fixed patches
    (posterior mode)."""
    was_training = vae.training
    vae.eval()
    recon = reconstruct(vae, patches, batch_size)
    vae.train(was_training)
    return {k: sum(v) / len(v) for k, v in metrics.per_image_metrics(recon, patches, lpips, batch_size).items()}


def pair_strip(vae: AutoencoderKL, patches: torch.Tensor) -> Image.Image:
    """Patches (top row) over their reconstructions (bottom row), as one PIL image."""
    was_training = vae.training
    vae.eval()
    recon = reconstruct(vae, patches, len(patches))
    vae.train(was_training)
    rows = [torch.cat(list(x.float().cpu().clamp(-1, 1)), dim=2) for x in (patches, recon)]
    pixels = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)


def finetune(cfg: VAEConfig, train_images: DecodedImages, val_patches: torch.Tensor) -> TrainResult:
    """Fine-tune the VAE of `cfg.model_id` on random patches of `train_images` through the shared loop.

    `val_patches` are fixed held-out patches evaluated at `validate_every` and at the end (logged as val_psnr,
    val_ssim, val_lpips). Returns the loop's `TrainResult`; the fine-tuned VAE is saved with `save_pretrained` in
    `run_dir/final`.
    """
    trainer = Trainer(cfg, config=cfg.to_dict())
    vae = prepare_for_training(load_vae(cfg.model_id, cfg.model_subfolder, config=cfg.model_config), cfg.trainable,
                               cfg.gradient_checkpointing)
    lpips = LPIPS(cfg.lpips_net)
    if trainer.is_main:  # before anything moves to the device, whose free memory the plan reads
        print(memory_plan(cfg, vae, lpips=lpips, device=trainer.device), flush=True)
    lpips = lpips.to(trainer.device)
    patches = PatchDataset(train_images, cfg.patch_size, cfg.patches_per_epoch, seed=cfg.seed,
                           hflip=cfg.hflip, vflip=cfg.vflip, rot90=cfg.rot90, min_foreground=cfg.min_foreground,
                           foreground_threshold=cfg.foreground_threshold)
    if cfg.cache_latents:
        # only what max_steps uses is encoded up front (a short run need not encode the whole pool)
        used = items_used(len(patches), cfg.batch_size, cfg.seed, cfg.max_steps * cfg.grad_accum)
        patches = PatchLatents(patches, vae, trainer.device, needed=used)
    weights = dict(mse_weight=cfg.mse_weight, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                   kl_weight=cfg.kl_weight)
    unwrap = trainer.accelerator.unwrap_model

    def step_fn(models: dict[str, nn.Module], batch: Any) -> dict[str, torch.Tensor]:
        return vae_loss(models["vae"], batch, lpips, **weights)

    def evaluate_fn(models: dict[str, nn.Module], step: int) -> dict[str, float]:
        vae = unwrap(models["vae"]).vae
        if trainer.accelerator.trackers:  # log_with: held-out patches over their reconstructions
            log_images(trainer.accelerator, {"heldout_reconstructions": pair_strip(vae, val_patches[:4])}, step)
        return held_out_metrics(vae, val_patches, lpips, cfg.batch_size)

    def save_final(models: dict[str, nn.Module], path: Path) -> None:
        unwrap(models["vae"]).vae.save_pretrained(path)

    return trainer.fit({"vae": VAEWithPosterior(vae)}, step_fn, patches, evaluate=evaluate_fn, save_final=save_final)


def finetune_control(cfg: VAEConfig, data: VAEData) -> TrainResult | None:
    """The control run of a 02 config, when `control_image_dir` is set: the same recipe, steps and seed on those
    images, evaluated on the same held-out patches (`data.val_patches`), in `run_dir/control` with its own config,
    checkpoints, log and final/ (`resume` continues it like the fine-tuned run). None, with a note, without one."""
    if not cfg.control_image_dir:
        print("control_image_dir='': no control run, so a gain over the base cannot be told apart from more training")
        return None
    ccfg = control_config(cfg)
    ccfg.save()
    cdata = control_data(ccfg, data)
    print(cdata.description)
    return finetune(ccfg, cdata.train_images, data.val_patches)


def train_from_config(config: dict) -> TrainResult:
    """What `python -m sdnb.train run_dir/config.json` runs for a 02_vae_finetune config (a control run's too)."""
    cfg = VAEConfig.from_dict(config)
    data = prepare_data(cfg)
    if cfg.is_control:
        data = control_data(cfg, data)
    return finetune(cfg, data.train_images, data.val_patches)
