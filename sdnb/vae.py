"""SD's VAE: loading, what is trained, the loss and the training step, and fine-tuning through the shared loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from sdnb.patches import DecodedImages, fixed_patches, list_images, split_images


def load_vae(model_id: str, subfolder: str = "vae", device: torch.device | str = "cpu") -> AutoencoderKL:
    """An `AutoencoderKL` in eval mode: from a hub id, a pipeline folder, a VAE folder or a run folder of 02/03."""
    path = Path(model_id)
    if path.is_dir():
        for candidate in (path / "final" / subfolder, path / "final", path / subfolder, path):
            if (candidate / "config.json").is_file():
                return AutoencoderKL.from_pretrained(candidate).to(device).eval().requires_grad_(False)
        raise FileNotFoundError(f"{model_id}: no VAE there (looked for config.json in final/, {subfolder}/ and the folder)")
    vae = AutoencoderKL.from_pretrained(model_id, subfolder=subfolder or None)
    return vae.to(device).eval().requires_grad_(False)


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


def set_trainable(vae: AutoencoderKL, trainable: str, gradient_checkpointing: bool = False) -> AutoencoderKL:
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
    """One training step's losses for a `VAEWithPosterior` on images in [-1, 1] (or a `CachedLatents` batch).

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




def finetune(cfg, train_images, val_patches: torch.Tensor):
    """Fine-tune the VAE of `cfg.model_id` on random patches of `train_images` through the shared loop.

    `cfg` is a `VAEConfig`; `val_patches` are fixed held-out patches evaluated at `validate_every` and at
    the end (logged as val_psnr, val_ssim, val_lpips). Returns the loop's `TrainResult`; the fine-tuned
    VAE is saved with `save_pretrained` in `run_dir/final`.
    """
    from sdnb.metrics import LPIPS
    from sdnb.patches import PatchDataset
    from sdnb.recon import evaluate
    from sdnb.train import Trainer, TrainSettings

    trainer = Trainer(TrainSettings.from_config(cfg), config=cfg.to_dict())
    vae = set_trainable(load_vae(cfg.model_id, cfg.model_subfolder), cfg.trainable, cfg.gradient_checkpointing)
    lpips = LPIPS(cfg.lpips_net).to(trainer.device)
    patches = PatchDataset(train_images, cfg.patch_size, cfg.patches_per_epoch, seed=cfg.seed,
                           hflip=cfg.hflip, vflip=cfg.vflip, rot90=cfg.rot90)
    if cfg.cache_latents:
        patches = CachedLatents(patches, vae, trainer.device)
    weights = dict(mse_weight=cfg.mse_weight, l1_weight=cfg.l1_weight, lpips_weight=cfg.lpips_weight,
                   kl_weight=cfg.kl_weight)
    unwrap = trainer.accelerator.unwrap_model

    def step_fn(models: dict[str, nn.Module], batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return vae_loss(models["vae"], batch, lpips, **weights)

    def evaluate_fn(models: dict[str, nn.Module], step: int) -> dict[str, float]:
        return evaluate(unwrap(models["vae"]).vae, val_patches, lpips, cfg.batch_size)

    def save_final(models: dict[str, nn.Module], path) -> None:
        unwrap(models["vae"]).vae.save_pretrained(path)

    return trainer.fit({"vae": VAEWithPosterior(vae)}, step_fn, patches, evaluate=evaluate_fn, save_final=save_final)


class CachedLatents(torch.utils.data.Dataset):
    """Decoder-only training on a fixed pool of patches, each encoded once by the frozen encoder.

    Items are {"images", "mean", "std"}; the decoder trains on latents sampled from the cached posterior.
    The pool is the first epoch's patches: augmentation is not redrawn in later epochs.
    """

    def __init__(self, patches: torch.utils.data.Dataset, vae: AutoencoderKL, device: torch.device | str = "cpu",
                 batch_size: int = 16):
        from tqdm.auto import tqdm

        self.images, self.mean, self.std = [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, len(patches), batch_size), desc="caching latents"):
                batch = torch.stack([patches[i] for i in range(start, min(start + batch_size, len(patches)))])
                posterior = vae.encode(batch.to(device)).latent_dist
                self.images.append(batch.add(1).mul(127.5).round().byte())  # uint8: a quarter of the memory
                self.mean.append(posterior.mean.cpu())
                self.std.append(posterior.std.cpu())
        self.images, self.mean, self.std = torch.cat(self.images), torch.cat(self.mean), torch.cat(self.std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[i].float().div(127.5).sub(1), "mean": self.mean[i], "std": self.std[i]}


@dataclass
class VAEData:
    """Training and held-out images (split by image), decoded once, and the fixed held-out patches."""

    train_paths: list[Path]
    val_paths: list[Path]
    train_images: DecodedImages
    val_patches: torch.Tensor


def prepare_data(cfg) -> VAEData:
    """List and check the images of a `VAEConfig` (before any model loads), split them, cut the held-out patches."""
    train_paths = list_images(cfg.image_dir, "image_dir")
    if cfg.val_image_dir:
        val_paths = list_images(cfg.val_image_dir, "val_image_dir")
    else:
        train_paths, val_paths = split_images(train_paths, cfg.val_fraction, cfg.seed)
    cache = Path(cfg.run_dir) / "cache"
    val_images = DecodedImages(val_paths, cache, min_side=cfg.patch_size)
    return VAEData(train_paths, val_paths, DecodedImages(train_paths, cache, min_side=cfg.patch_size),
                   fixed_patches(val_images, cfg.patch_size, cfg.n_val_patches, seed=cfg.seed))


def train_from_config(config: dict):
    """What `python -m sdnb.train run_dir/config.json` runs for a 02_vae_finetune config."""
    from sdnb.config import VAEConfig

    cfg = VAEConfig(**{k: v for k, v in config.items() if k != "stage"})
    data = prepare_data(cfg)
    return finetune(cfg, data.train_images, data.val_patches)
