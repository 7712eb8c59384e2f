"""Stable Diffusion fine-tuning: the pieces, the training step, a stable validation loss, and the run.

The step follows diffusers' train_text_to_image (encode, noise, predict, loss) with its options:
min-SNR weighting (`compute_snr`), offset ("zero-frequency") noise, v-prediction when the scheduler's
config says so. The validation loss draws the same noise and timesteps for each held-out image at every
evaluation, so its curve moves only when the weights do. `finetune` runs it all through the shared loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import compute_snr
from torch import nn
from tqdm.auto import tqdm

from sdnb.buckets import BucketDataset, CaptionedImage, bucket_batches, read_captions, split_by_image, to_tensor, \
    tokenize


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
        """Move to `device`; frozen models (VAE, and the text encoder unless trained) in `frozen_dtype`."""
        trained = any(p.requires_grad for p in self.text_encoder.parameters())
        for model, dtype in ((self.unet, torch.float32), (self.vae, frozen_dtype),
                             (self.text_encoder, torch.float32 if trained else frozen_dtype)):
            model.to(device) if model.dtype == dtype else model.to(device, dtype)
        return self


def load_sd(model_id: str, vae_path: str = "") -> SDParts:
    """The pieces of a diffusers SD v1 pipeline (hub id or folder), with another VAE (a 02 run or VAE folder) if given."""
    from sdnb.vae import load_vae

    pipe = StableDiffusionPipeline.from_pretrained(model_id, safety_checker=None, requires_safety_checker=False)
    vae = load_vae(vae_path) if vae_path else pipe.vae
    parts = SDParts(pipe.unet, vae.eval().requires_grad_(False), pipe.text_encoder.eval().requires_grad_(False),
                    pipe.tokenizer, DDPMScheduler.from_config(pipe.scheduler.config), pipe.scheduler)
    parts.unet.requires_grad_(False)
    return parts


def set_trainable(parts: SDParts, train_text_encoder: bool = False, gradient_checkpointing: bool = False) -> dict:
    """Make the UNet (and the text encoder if asked) trainable; returns the models dict for `Trainer.fit`."""
    models = {"unet": parts.unet.train().requires_grad_(True)}
    if gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    if train_text_encoder:
        models["text_encoder"] = parts.text_encoder.train().requires_grad_(True)
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
    """The loop's `step_fn(models, batch)` for batches of pixels or cached latents, token ids or cached embeddings."""

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
        if "encoder_hidden_states" in batch:
            states = batch["encoder_hidden_states"]
        elif "text_encoder" in models:
            states = models["text_encoder"](batch["input_ids"], return_dict=False)[0]
        else:
            with torch.no_grad():
                states = parts.text_encoder(batch["input_ids"], return_dict=False)[0]
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


class CachedLatents(torch.utils.data.Dataset):
    """A `BucketDataset` (no jitter, no flip) with VAE posteriors, and text embeddings if the encoder is frozen, computed once."""

    def __init__(self, dataset: BucketDataset, parts: SDParts, device: torch.device, embeddings: bool = True,
                 batch_size: int = 4):
        if dataset.crop_jitter > 0 or dataset.flip:
            raise ValueError("cache_latents=True needs crop_jitter=0 and flip=False (cached latents cannot vary)")
        self.dataset, self.moments = dataset, []
        with torch.no_grad():
            for i in tqdm(range(len(dataset)), desc="cache latents"):
                pixels = to_tensor(dataset.image(i))[None].to(device, parts.vae.dtype)  # the centred crop
                self.moments.append(parts.vae.encode(pixels).latent_dist.parameters[0].float().cpu())
            self.states = None
            if embeddings:
                captions = [r.caption for r in dataset.records] + [""]
                self.states = torch.cat([encode_prompts(parts.text_encoder, parts.tokenizer, captions[k:k + batch_size],
                                                        device).float().cpu() for k in range(0, len(captions), batch_size)])
        self.bucket_of = dataset.bucket_of

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        caption = self.dataset.caption(index, self.dataset.rng(index))  # caption dropout still applies
        item = {"moments": self.moments[index], "index": index}
        if self.states is not None:
            item["encoder_hidden_states"] = self.states[-1 if caption == "" else index]
        else:
            item["input_ids"] = tokenize(self.dataset.tokenizer, [caption])[0]
        return item


def build_datasets(cfg, train: list[CaptionedImage], val: list[CaptionedImage], tokenizer=None):
    """(training dataset, batch_sampler_fn, validation dataset) for an `SDConfig`; captions tokenized if a tokenizer is given."""
    train_ds = BucketDataset(train, cfg.resolution, tokenizer, crop_jitter=cfg.crop_jitter, flip=cfg.flip,
                             caption_dropout=cfg.caption_dropout, seed=cfg.seed)
    val_ds = BucketDataset(val, cfg.resolution, tokenizer, seed=cfg.seed, augment=False)
    return train_ds, bucket_batches(train_ds.bucket_of, cfg.batch_size, cfg.seed), val_ds


def resolve_optimizer(optimizer: str, device: torch.device) -> str:
    """'auto' = bitsandbytes' 8-bit AdamW on a CUDA GPU when it is installed, else AdamW."""
    if optimizer != "auto":
        return optimizer
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "adamw"
    return "adamw8bit" if device.type == "cuda" else "adamw"


def finetune(cfg, parts: SDParts, train: list[CaptionedImage], val: list[CaptionedImage]):
    """Fine-tune `parts` on captioned images through the shared loop; returns its `TrainResult`.

    Validation loss every `validate_every` steps (logged as val_loss; the best weights kept in run_dir/best),
    sample grids at every checkpoint (run_dir/samples), the pipeline in run_dir/final.
    """
    from sdnb.runtime import pick_device
    from sdnb.sd_outputs import Callbacks
    from sdnb.train import Trainer, TrainSettings

    sync_what = cfg.sync_what if cfg.sync_dir else "full"
    if sync_what == "auto":
        from sdnb.sd_outputs import drive_budget
        sync_what = drive_budget(cfg, parts).sync_what
    settings = {**cfg.to_dict(), "optimizer": resolve_optimizer(cfg.optimizer, pick_device(cfg.device))}
    if sync_what == "weights":
        settings["sync_dir"] = ""  # the loop mirrors full states; weights are mirrored by Callbacks
    trainer = Trainer(TrainSettings.from_config(settings), config=cfg.to_dict())
    device = trainer.device
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(trainer.accelerator.mixed_precision, torch.float32)
    models = set_trainable(parts, cfg.train_text_encoder, cfg.gradient_checkpointing)
    parts.to(device, frozen if device.type == "cuda" else torch.float32)
    train_ds, batches, val_ds = build_datasets(cfg, train, val, parts.tokenizer)
    if cfg.cache_latents:
        train_ds = CachedLatents(train_ds, parts, device, embeddings=not cfg.train_text_encoder)
    callbacks = Callbacks(cfg, parts, StableValidation(parts, val_ds, cfg.seed) if len(val_ds) else None,
                          trainer.accelerator.unwrap_model,
                          weights_sync_dir=cfg.sync_dir if sync_what == "weights" and trainer.is_main else "")
    if trainer.is_main:
        callbacks.base_samples(trainer.accelerator.autocast())
    try:
        return trainer.fit(models, make_step_fn(parts, cfg.snr_gamma, cfg.noise_offset), train_ds,
                           batch_sampler_fn=batches, lrs={"text_encoder": cfg.text_encoder_lr},
                           evaluate=callbacks.evaluate if len(val_ds) else None, sample=callbacks.sample,
                           save_final=callbacks.save_final)
    finally:
        callbacks.close()


def train_from_config(config: dict) -> Any:
    """`python -m sdnb.train run_dir/config.json` for stage 'sd': what 03_sd_finetune does, without display."""
    from sdnb.config import SDConfig
    from sdnb.sd_outputs import drive_budget, overfit_report, plot_validation, write_metrics
    from sdnb.sd_samples import sample_sheet
    from sdnb.viz import save

    import matplotlib.pyplot as plt
    cfg = SDConfig(**{k: v for k, v in config.items() if k != "stage"})
    records = read_captions(cfg.data_dir, progress=False)
    train, val = split_by_image(records, cfg.val_fraction, cfg.seed)
    print(f"{len(train)} training images, {len(val)} validation images", flush=True)
    parts = load_sd(cfg.model_id, cfg.vae_path)
    print(drive_budget(cfg, parts), flush=True)
    result = finetune(cfg, parts, train, val)
    fig = plot_validation(cfg.path)
    save(fig, cfg.path / "grids" / "loss.png")
    plt.close(fig)
    sheet = sample_sheet(cfg.path / "samples")
    if sheet is not None:
        sheet.save(cfg.path / "grids" / "samples_by_checkpoint.png")
    write_metrics(cfg.path, cfg.overfit_patience)
    print(overfit_report(cfg.path, cfg.overfit_patience), flush=True)
    return result
