"""`VAEConfig`: 02_vae_finetune's parameters, and the named recipes that fill the ones left at None.

The recipes: "fundus-article" is the fine-tuning repository that accompanies the fundus article (RAdam 1e-4,
0.5*MSE + 0.002*LPIPS(alex) + 1e-6*KL, whole VAE); "ft-mse" follows Stability AI's sd-vae-ft-mse model card
(huggingface.co/stabilityai/sd-vae-ft-mse: decoder only, MSE + 0.1*LPIPS, EMA); "sdnb" is this project's default,
chosen on the embedded default by benchmarks/bench_recipes.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from sdnb.config import ConfigError, param
from sdnb.data.folders import overlap
from sdnb.train.config import MAX_LR, OPTIMIZERS, TrainConfig

# Named VAE recipes. Every value shows in 02's parameters cell; None there = the recipe's.
VAE_RECIPES: dict[str, dict[str, Any]] = {
    # Default: whole VAE with a perceptual term strong enough to matter and EMA; measured in benchmarks/bench_recipes.py.
    "sdnb": dict(trainable="all", optimizer="adamw", lr=1e-4, weight_decay=0.0, batch_size=8, grad_accum=1,
                 mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=1e-6, ema=True, ema_decay=0.999,
                 hflip=True, vflip=True, rot90=True),
    # The fundus article's repository: RAdam 1e-4, 0.5*MSE + 0.002*LPIPS(alex) + 1e-6*KL, whole VAE, batch 8, flips.
    "fundus-article": dict(trainable="all", optimizer="radam", lr=1e-4, weight_decay=0.0, batch_size=4, grad_accum=2,
                           mse_weight=0.5, l1_weight=0.0, lpips_weight=0.002, kl_weight=1e-6, ema=False,
                           ema_decay=0.9999, hflip=True, vflip=False, rot90=False),
    # Stability's sd-vae-ft-MSE: decoder only (the latent space, and so every UNet, is kept), MSE + 0.1*LPIPS, EMA.
    "ft-mse": dict(trainable="decoder", optimizer="adamw", lr=1e-4, weight_decay=0.0, batch_size=8, grad_accum=1,
                   mse_weight=1.0, l1_weight=0.0, lpips_weight=0.1, kl_weight=0.0, ema=True, ema_decay=0.999,
                   hflip=True, vflip=False, rot90=False),
}


@dataclass
class VAEConfig(TrainConfig):
    """02_vae_finetune: fine-tune SD's VAE on random patches of large images."""

    stage: ClassVar[str] = "vae"

    image_dir: str = param("data/FIVES/train/Original", pattern=r".+", help="folder of large training images")
    val_image_dir: str = param("", help="held-out images; '' = a seeded split of image_dir")
    val_fraction: float = param(0.2, gt=0, le=0.5, help="share of image_dir held out when val_image_dir is ''")
    control_image_dir: str = param("", help="other images (e.g. natural photos) for a control VAE trained with the "
                                            "same recipe and steps (run_dir/control); '' = no control")
    is_control: bool = param(False, help="True in the control run's own config (sdnb.vae.control): it trains on "
                                      "control_image_dir and is measured on image_dir's held-out images")
    model_id: str = param("CompVis/stable-diffusion-v1-4", pattern=r".+")
    model_subfolder: str = param("vae", help="'' when model_id is a VAE folder itself")
    model_config: str = param("", help="for a single .safetensors/.ckpt model_id: the base model's folder or hub id "
                                       "holding its configuration; '' = diffusers guesses it (needs the network)")
    patch_size: int = param(512, ge=16, multiple_of=8)
    patches_per_epoch: int = param(1000, ge=1, help="random patches drawn per epoch")
    n_val_patches: int = param(64, ge=1, help="fixed held-out patches for the metrics")
    min_foreground: float = param(0.5, ge=0, le=1, help="share of each training and held-out patch that must be "
                                                        "field of view; 0 = any patch (sdnb.vae.foreground)")
    foreground_threshold: float = param(0.1, gt=0, le=1, help="field of view: blurred luminance above this share "
                                                              "of the image's maximum")
    recipe: str = param("sdnb", choices=tuple(VAE_RECIPES), help="fills every value left at None")
    trainable: str | None = param(None, choices=("all", "decoder"))
    optimizer: str | None = param(None, choices=OPTIMIZERS)
    lr: float | None = param(None, gt=0, le=MAX_LR)
    weight_decay: float | None = param(None, ge=0)
    batch_size: int | None = param(None, ge=1)
    grad_accum: int | None = param(None, ge=1)
    mse_weight: float | None = param(None, ge=0)
    l1_weight: float | None = param(None, ge=0)
    lpips_weight: float | None = param(None, ge=0)
    lpips_net: str = param("alex", choices=("alex", "vgg", "squeeze"))
    kl_weight: float | None = param(None, ge=0, help="KL summed over latent dims, averaged over the batch")
    ema: bool | None = param(None)
    ema_decay: float | None = param(None, gt=0, le=1)
    hflip: bool | None = param(None)
    vflip: bool | None = param(None)
    rot90: bool | None = param(None)
    gradient_checkpointing: bool = param(False, help="about half the memory, ~30% slower")
    cache_latents: bool = param(False, help="decoder-only: encode a fixed pool of patches once")
    tile_size: int = param(512, ge=16, multiple_of=8, help="tiles for full-size reconstructions")
    fid_features: str = param("auto", choices=("auto", "torchmetrics", "fid-helper"))
    n_bootstrap: int = param(1000, ge=0, help="bootstrap resamples of the 95% intervals; 0 = no intervals")
    export_single_file: bool = param(True, help="also write the VAE as one .safetensors file (run_dir/export)")
    hub_repo_id: str = param("", pattern=r"|[\w.-]+/[\w.-]+", help="push final/ with a model card there; '' = off")
    hub_private: bool = param(True, help="create the Hub repository as private")

    def validate(self) -> None:
        recipe = VAE_RECIPES.get(self.recipe)
        if recipe is None:
            raise ConfigError(f"recipe={self.recipe!r} is not accepted: expected one of {', '.join(VAE_RECIPES)}")
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().validate()
        if self.patches_per_epoch < self.batch_size:
            raise ConfigError(f"patches_per_epoch={self.patches_per_epoch} is not accepted with batch_size="
                              f"{self.batch_size}: an epoch would hold no full batch; set patches_per_epoch >= "
                              "batch_size")
        if self.val_image_dir and overlap(self.image_dir, self.val_image_dir):
            raise ConfigError(f"val_image_dir={self.val_image_dir!r} is not accepted: it is, contains or lies inside "
                              f"image_dir={self.image_dir!r}, so the held-out metrics would be measured on training "
                              "images; choose a separate folder, or val_image_dir='' to hold out val_fraction of "
                              "image_dir by image")
        for name in ("image_dir", "val_image_dir"):
            if self.control_image_dir and getattr(self, name) and overlap(self.control_image_dir, getattr(self, name)):
                raise ConfigError(f"control_image_dir={self.control_image_dir!r} is not accepted: it is, contains or "
                                  f"lies inside {name}={getattr(self, name)!r}, so the control would train on the "
                                  "domain images; choose a folder of other images (e.g. natural photos)")
        if self.is_control and not self.control_image_dir:
            raise ConfigError("is_control=True is not accepted with control_image_dir='': a control run trains on "
                              "control_image_dir")
        if self.cache_latents and self.trainable != "decoder":
            raise ConfigError("cache_latents=True is not accepted with trainable='all': cached latents need a frozen "
                              "encoder (set trainable='decoder' or recipe='ft-mse')")
