"""`SDConfig`: 03_sd_finetune's parameters. The defaults follow EveryDream2's recipe as the seed report used it
(lr 1e-6 constant, AdamW 8-bit, 2% crop jitter, offset noise 0.02, validation every 300 steps, 5 fixed sample
prompts at CFG 7, 4 and 1.01; github.com/victorchall/EveryDream2trainer, its docs and defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdnb.config import ConfigError, param
from sdnb.train.config import MAX_LR, OPTIMIZERS, TrainConfig


@dataclass
class SDConfig(TrainConfig):
    """03_sd_finetune: fine-tune SD 1.5's UNet on captioned images."""

    stage: ClassVar[str] = "sd"

    data_dir: str = param("runs/01_captioning/train", pattern=r".+", help="images with .txt caption sidecars")
    model_id: str = param("stable-diffusion-v1-5/stable-diffusion-v1-5", pattern=r".+")
    vae_path: str = param("", help="a fine-tuned VAE (a 02 run folder, a VAE folder or file); '' = the base VAE")
    model_config: str = param("", help="for a single .safetensors/.ckpt model_id or vae_path: the base model's folder or "
                                       "hub id holding its configuration; '' = diffusers guesses it (needs the network)")
    lora_rank: int = param(0, ge=0, le=1024, help="0 = fine-tune the whole UNet; > 0 = train a LoRA of this rank (peft)")
    lora_alpha: float = param(0.0, ge=0, help="LoRA scale alpha / rank; 0 = lora_rank (scale 1, as diffusers' trainer)")
    resolution: int = param(512, ge=64, multiple_of=64)
    val_fraction: float = param(0.1, ge=0, le=0.5, help="share of the images held out, by image, seeded")
    crop_jitter: float = param(0.02, ge=0, le=0.2, help="random crop shrink and shift, share of the short side")
    flip: bool = param(False, help="random horizontal flips")
    caption_dropout: float = param(0.0, ge=0, le=1, help="share of steps trained with an empty caption")
    cache_latents: bool = param(False, help="encode images and captions once (needs crop_jitter=0, flip=False)")
    train_text_encoder: bool = param(False)
    text_encoder_lr: float = param(5e-7, gt=0, le=MAX_LR)
    gradient_checkpointing: bool = param(True, help="less activation memory, ~20-30% slower")
    snr_gamma: float = param(0.0, ge=0, help="Min-SNR weighting; 5.0 is the paper's; 0 = off")
    noise_offset: float = param(0.02, ge=0, le=1, help="offset (zero-frequency) noise; EveryDream2 uses 0.02")
    sample_prompts: list = param(["a photograph of a mountain lake at sunrise", "a portrait of a woman in a city street",
                                  "a bowl of fruit on a wooden table", "a dog running on a beach",
                                  "a modern building against a blue sky"])
    negative_prompt: str = param("")
    sample_cfg_scales: list = param([7.0, 4.0, 1.01])
    sample_steps: int = param(30, ge=1)
    overfit_patience: int = param(3, ge=1, help="evaluations above the best validation loss that flag over-fitting")
    save_best: bool = param(True, help="keep the fp16 UNet of the lowest validation loss in run_dir/best")
    sync_what: str = param("auto", choices=("auto", "full", "weights"),
                           help="mirror full training states or fp16 UNet weights; auto = full if it fits")
    final_weights: str = param("fp16", choices=("fp16", "fp32", "both"),
                               help="final pipeline: fp16 halves it (loads as fp32 too); both adds fp16 files beside fp32")
    export_single_file: bool = param(True, help="also write the result as one .safetensors file (run_dir/export)")
    hub_repo_id: str = param("", pattern=r"|[\w.-]+/[\w.-]+", help="push final/ with a model card there; '' = off")
    hub_private: bool = param(True, help="create the Hub repository as private")
    # the training loop's fields, with EveryDream2's defaults (the seed's recipe)
    lr: float = param(1e-6, gt=0, le=MAX_LR)
    optimizer: str = param("auto", choices=OPTIMIZERS, help="auto = 8-bit AdamW on a GPU with bitsandbytes, else AdamW")
    weight_decay: float = param(0.01, ge=0)
    batch_size: int = param(2, ge=1)
    max_steps: int = param(0, ge=0, help="0 = budget in epochs only")
    max_epochs: int = param(30, ge=0)
    validate_every: int = param(300, ge=0, help="0 = at the end only")
    checkpoint_every: int = param(500, ge=0, help="0 = off")

    def validate(self) -> None:
        super().validate()
        if self.cache_latents and (self.crop_jitter > 0 or self.flip):
            raise ConfigError(f"cache_latents=True is not accepted with crop_jitter={self.crop_jitter} or "
                              f"flip={self.flip}: cached latents cannot vary (set crop_jitter=0 and flip=False)")
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError(f"sample_prompts={self.sample_prompts!r} is not accepted: expected a list of strings")
        if not self.sample_cfg_scales or not all(isinstance(c, (int, float)) and c >= 1 for c in self.sample_cfg_scales):
            raise ConfigError(f"sample_cfg_scales={self.sample_cfg_scales!r} is not accepted: expected numbers >= 1")
