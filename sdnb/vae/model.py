"""SD's VAE as 02 trains it: what is trained, the module whose forward the loop calls, the loss (one training
step), and reconstructions in batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn


def scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent pixel covers on a side (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


class VAEWithPosterior(nn.Module):
    """The VAE as one trainable module whose forward returns (reconstruction, KL per image).

    Going through `forward` keeps DistributedDataParallel's gradient sync working under `accelerate launch`.
    """

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae
        self.sample_posterior = sample_posterior

    def forward(self, images: torch.Tensor, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mean is not None:  # cached latents (decoder-only training): the frozen encoder already ran
            latents = mean + std * torch.randn_like(std) if self.sample_posterior else mean
            return self.vae.decode(latents).sample, torch.zeros(len(images), device=images.device)
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if self.sample_posterior else posterior.mode()
        return self.vae.decode(latents).sample, posterior.kl()


def prepare_for_training(vae: AutoencoderKL, trainable: str, gradient_checkpointing: bool = False) -> AutoencoderKL:
    """'all' trains encoder and decoder; 'decoder' freezes the encoder (and quant_conv), keeping the latent space."""
    vae.train().requires_grad_(True)
    if trainable == "decoder":
        vae.encoder.requires_grad_(False)
        if vae.quant_conv is not None:
            vae.quant_conv.requires_grad_(False)
    if gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae


def vae_loss(model: nn.Module, images: torch.Tensor | dict, lpips: nn.Module | None, mse_weight: float, l1_weight: float,
             lpips_weight: float, kl_weight: float) -> dict[str, torch.Tensor]:
    """One training step's losses for a `VAEWithPosterior` on images in [-1, 1] (or a `PatchLatents` batch).

    loss = mse_weight*MSE + l1_weight*L1 + lpips_weight*LPIPS + kl_weight*KL, where KL is summed over the
    latent dimensions and averaged over the batch (so gradient accumulation scales it correctly).
    """
    # encode (or take the cached posterior), sample a latent from it and decode
    if isinstance(images, dict):
        images, recon_kl = images["images"], model(images["images"], images["mean"], images["std"])
    else:
        recon_kl = model(images)
    recon, kl = recon_kl
    recon = recon.float()
    # pixel losses
    mse = F.mse_loss(recon, images.float())
    l1 = F.l1_loss(recon, images.float())
    # perceptual loss: LPIPS with gradient (never under no_grad), inputs in [-1, 1]
    perceptual = lpips(recon, images.float()).mean() if lpips is not None and lpips_weight > 0 else recon.new_zeros(())
    # KL towards the unit Gaussian
    kl = kl.float().mean()
    total = mse_weight * mse + l1_weight * l1 + lpips_weight * perceptual + kl_weight * kl
    return {"loss": total, "mse": mse.detach(), "l1": l1.detach(), "lpips": perceptual.detach(), "kl": kl.detach()}


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
