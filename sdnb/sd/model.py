"""Stable Diffusion as 03 trains it: the pieces, the training step and a stable validation loss.

The step follows diffusers' train_text_to_image (encode, noise, predict, loss) with its options:
min-SNR weighting (`compute_snr`), offset ("zero-frequency") noise, v-prediction when the scheduler's
config says so. The validation loss draws the same noise and timesteps for each held-out image at every
evaluation, so its curve moves only when the weights do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import nn

from sdnb.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, has_lora, place
from sdnb.models import load_pipeline
from sdnb.sd.buckets import BucketDataset, tokenize


@dataclass
class SDParts:
    """A Stable Diffusion v1 pipeline's pieces: the UNet trains, the rest is frozen unless said otherwise."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: DDPMScheduler  # the training noise schedule
    scheduler: Any  # the pipeline's own sampler, used for samples and saved with the result

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype = torch.float32) -> "SDParts":
        """Move to `device`; frozen models (VAE, and the text encoder unless trained) in `frozen_dtype`; a model with
        a LoRA adapter keeps its base weights in `frozen_dtype` and the adapter in fp32."""
        trained = any(p.requires_grad for p in self.text_encoder.parameters())
        for model, dtype in ((self.unet, torch.float32), (self.vae, frozen_dtype),
                             (self.text_encoder, torch.float32 if trained else frozen_dtype)):
            if has_lora(model):
                place(model, device, frozen_dtype)
            else:
                model.to(device) if model.dtype == dtype else model.to(device, dtype)
        return self

    def pipeline(self, unet: nn.Module | None = None, text_encoder: nn.Module | None = None) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline of these pieces (or with the given UNet / text encoder), no safety checker,
        progress bar off: what samples are drawn with and what `final/` is saved from."""
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=text_encoder or self.text_encoder,
                                       tokenizer=self.tokenizer, unet=unet or self.unet, scheduler=self.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_parts(model_id: str, vae_path: str = "", model_config: str = "") -> SDParts:
    """The pieces of an SD v1 pipeline (hub id, folder, 03 run folder or single file; see `sdnb.models`) in fp32 on
    the CPU, with another VAE (a 02 run folder, VAE folder or file) if given; everything frozen until
    `trainable_models`."""
    pipe = load_pipeline(model_id, "cpu", "no", "model_id", vae=vae_path, config=model_config)
    parts = SDParts(pipe.unet, pipe.vae.eval().requires_grad_(False), pipe.text_encoder.eval().requires_grad_(False),
                    pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config), pipe.scheduler)
    parts.unet.requires_grad_(False)
    return parts


def trainable_models(parts: SDParts, train_text_encoder: bool = False, gradient_checkpointing: bool = False,
                     lora_rank: int = 0, lora_alpha: float = 0.0) -> dict:
    """Make the UNet (and the text encoder if asked) trainable, whole or (`lora_rank` > 0) through a LoRA adapter
    (`sdnb.lora`); returns the models dict for `Trainer.fit`."""
    def trainable(model: nn.Module, targets: tuple[str, ...]) -> nn.Module:
        return add_lora(model, lora_rank, lora_alpha, targets) if lora_rank else model.requires_grad_(True)

    models = {"unet": trainable(parts.unet, UNET_TARGETS).train()}
    if gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if train_text_encoder:
        models["text_encoder"] = trainable(parts.text_encoder, TEXT_TARGETS).train()
        if gradient_checkpointing:
            parts.text_encoder.gradient_checkpointing_enable()
    return models


def scale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents as the UNet sees them: (z - shift_factor) * scaling_factor (0.18215 for SD v1)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def diffusion_loss(unet: nn.Module, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   noise_scheduler: DDPMScheduler, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None, snr_gamma: float = 0.0,
                   noise_offset: float = 0.0) -> torch.Tensor:
    """Per-image denoising loss (MSE over pixels) of `unet` on clean `latents`; random noise and timesteps unless given.

    `noise_offset` adds a per-channel constant to the noise (offset / zero-frequency noise, so the model can learn
    overall brightness); `snr_gamma` > 0 weights timesteps by min(SNR, gamma) (Min-SNR, Hang et al. 2023, arXiv:2303.09556).
    """
    b = latents.shape[0]
    # noise: Gaussian noise (plus the offset) at a random timestep per image, added by the forward process
    if noise is None:
        noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
        if noise_offset > 0:
            noise = noise + noise_offset * torch.randn(b, latents.shape[1], 1, 1, device=latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    # predict: the UNet, called through forward (DistributedDataParallel synchronises gradients there)
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    # loss: against the noise (epsilon) or the velocity (v-prediction), as the scheduler's config says
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"the scheduler's prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        snr = compute_snr(noise_scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if kind == "v_prediction" else snr)
        loss = loss * weight
    return loss


def make_step_fn(parts: SDParts, snr_gamma: float = 0.0, noise_offset: float = 0.0):
    """The loop's `step_fn(models, batch)` for batches of pixels or cached latents, and captions (strings), token ids
    or cached embeddings."""

    def step_fn(models: dict[str, nn.Module], batch: dict) -> dict[str, torch.Tensor]:
        # encode: images to latents with the frozen VAE (or sample the cached posterior), captions to embeddings
        with torch.no_grad():
            if "moments" in batch:
                mean, logvar = batch["moments"].float().chunk(2, dim=1)
                eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)  # as latent_dist.sample() draws
                z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps
            else:
                z = parts.vae.encode(batch["pixel_values"].to(parts.vae.dtype)).latent_dist.sample()
            latents = scale_latents(parts.vae, z.float())
        ids = batch.get("input_ids")
        if ids is None and "caption" in batch:
            ids = tokenize(parts.tokenizer, batch["caption"]).to(latents.device)
        if "encoder_hidden_states" in batch:
            states = batch["encoder_hidden_states"]
        elif "text_encoder" in models:
            states = models["text_encoder"](ids, return_dict=False)[0]
        else:
            with torch.no_grad():
                states = parts.text_encoder(ids, return_dict=False)[0]
        # noise, predict and loss (mean over the batch)
        loss = diffusion_loss(models["unet"], latents, states, parts.noise_scheduler, snr_gamma=snr_gamma,
                              noise_offset=noise_offset).mean()
        return {"loss": loss}

    return step_fn


@torch.no_grad()
def encode_prompts(text_encoder: nn.Module, tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    """Text embeddings (last hidden state) of captions."""
    return text_encoder(tokenize(tokenizer, captions).to(device), return_dict=False)[0]


class StableValidation:
    """Validation loss with fixed noise and timesteps: evaluating the same weights twice gives the same number.

    Each held-out image gets `draws` noise tensors and timesteps spread over the schedule (stratified), drawn once
    from a generator seeded by (seed, image); latents are the VAE posterior's mean; no offset noise, no weighting.
    """

    def __init__(self, parts: SDParts, dataset: BucketDataset, seed: int = 0, draws: int = 4):
        self.parts, self.dataset, self.seed, self.draws = parts, dataset, seed, draws
        self._latents: list[torch.Tensor] | None = None
        self._noise: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._states: torch.Tensor | None = None

    def _prepare(self, device: torch.device) -> None:
        vae, T = self.parts.vae, self.parts.noise_scheduler.config.num_train_timesteps
        self._latents = []
        for i in range(len(self.dataset)):
            pixels = self.dataset[i]["pixel_values"][None].to(device, vae.dtype)
            z = scale_latents(vae, vae.encode(pixels).latent_dist.mode().float())
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            noise = torch.randn((self.draws, *z.shape[1:]), generator=g)
            t = ((torch.arange(self.draws) + torch.rand(self.draws, generator=g)) * T / self.draws).long().clamp(max=T - 1)
            self._latents.append(z.cpu())
            self._noise.append((noise, t))

    @torch.no_grad()
    def __call__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> float:
        """Mean loss over the held-out images (text_encoder: the trained one, else the frozen one)."""
        device = next(unet.parameters()).device
        if self._latents is None:
            self._prepare(device)
        trained_te = text_encoder is not None
        if trained_te or self._states is None:
            captions = [r.caption for r in self.dataset.records]
            states = encode_prompts(text_encoder or self.parts.text_encoder, self.parts.tokenizer, captions, device)
            self._states = None if trained_te else states
        else:
            states = self._states
        total = 0.0
        for i, (z, (noise, t)) in enumerate(zip(self._latents, self._noise)):
            z = z.to(device).expand(self.draws, -1, -1, -1)
            s = states[i:i + 1].expand(self.draws, -1, -1)
            total += diffusion_loss(unet, z, s, self.parts.noise_scheduler, noise.to(device), t.to(device)).mean().item()
        return total / max(1, len(self._latents))
