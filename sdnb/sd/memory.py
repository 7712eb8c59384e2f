"""03's memory plan (`sdnb.memory`): SD's UNet trains (whole, or a LoRA adapter; the text encoder too if asked), the
VAE and the text encoder are frozen in half precision on a GPU, and the step is 03's own (`make_step_fn`: encode,
noise, predict, loss), run once on fake tensors of the models' real architectures."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel

from sdnb.memory import HALF, Choices, Plans, fake_tensors, plan, step_peak
from sdnb.memory.count import to_fake
from sdnb.runtime import pick_device
from sdnb.sd.config import SDConfig
from sdnb.sd.model import SDParts, make_step_fn, trainable_models

SUGGESTED_LORA_RANK = 16  # what the plan proposes when only a LoRA fits (diffusers' LoRA examples use 4 to 128)


def architectures(parts: SDParts) -> dict[str, Any]:
    """The configs the plan builds fake models from: the UNet's, the VAE's, the text encoder's, the noise schedule."""
    return {"unet": dict(parts.unet.config), "vae": dict(parts.vae.config), "text_encoder": parts.text_encoder.config,
            "noise_scheduler": dict(parts.noise_scheduler.config)}


def meta_parts(configs: dict[str, Any]) -> SDParts:
    """SD's pieces with the real architectures on the meta device (no memory), frozen; call under
    `torch.device("meta")`."""
    te_config = configs["text_encoder"]
    if isinstance(te_config, dict):
        te_config = CLIPTextConfig(**te_config)
    unet = UNet2DConditionModel.from_config(configs["unet"]).requires_grad_(False)
    vae = AutoencoderKL.from_config(configs["vae"]).eval().requires_grad_(False)
    text_encoder = CLIPTextModel(te_config).eval().requires_grad_(False)
    with torch.device("cpu"):  # the schedule's tables are real tensors
        noise = DDPMScheduler.from_config(configs.get("noise_scheduler") or {})
    return SDParts(unet, vae, text_encoder, None, noise, noise)


def fake_batch(cfg: SDConfig, c: Choices, max_length: int) -> dict[str, Tensor]:
    """A batch as the loop hands it to the step: pixels (or cached latent moments) and token ids (or embeddings)."""
    b, latent = c.batch_size, c.resolution // 8
    batch = {"moments": torch.randn(b, 8, latent, latent)} if cfg.cache_latents else \
        {"pixel_values": torch.randn(b, 3, c.resolution, c.resolution)}
    batch["input_ids"] = torch.randint(0, 1000, (b, max_length))
    return batch


def measure(cfg: SDConfig, configs: dict[str, Any]):
    """`sdnb.memory.Measure` for 03: (trained parameters, frozen ones, step peak, step peak without gradients)."""
    def run(c: Choices) -> tuple[list[Tensor], list[Tensor], int, int]:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # diffusers' note on casting with to()
            parts = meta_parts(configs)
            models = trainable_models(parts, cfg.train_text_encoder, c.gradient_checkpointing, c.lora_rank,
                                      cfg.lora_alpha)
            parts.to("meta", HALF.get(c.precision, torch.float32))  # as on the GPU: frozen models in half precision
        mode = fake_tensors()
        to_fake(mode, parts.unet, parts.vae, parts.text_encoder)
        with mode:
            trained = [p for m in models.values() for p in m.parameters() if p.requires_grad]
            frozen = [p for m in (parts.unet, parts.vae, parts.text_encoder) for p in m.parameters()
                      if not p.requires_grad]
            batch = fake_batch(cfg, c, parts.text_encoder.config.max_position_embeddings)
            step = make_step_fn(parts, cfg.snr_gamma, cfg.noise_offset)
            peak, peak_no_grads = step_peak(lambda: step(models, batch)["loss"], trained, c.precision)
        return trained, frozen, peak, peak_no_grads

    return run


def memory_plan(cfg: SDConfig, parts: SDParts | None = None, configs: dict[str, Any] | None = None,
                device: torch.device | str | None = None) -> Plans:
    """The GPU memory 03 needs with `cfg` (weights, gradients, optimizer state, frozen models, activations), on the
    device found (`cfg.device`) and, without a CUDA GPU, on a 16 GB T4; with the first change that fits when it does
    not. The architectures come from `parts` (loaded) or `configs` (`architectures`)."""
    configs = configs or architectures(parts)
    choices = Choices(cfg.batch_size, cfg.grad_accum, cfg.resolution, cfg.mixed_precision, cfg.optimizer,
                      cfg.gradient_checkpointing, cfg.lora_rank, cfg.ema)
    title = "SD UNet" + (" and text encoder" if cfg.train_text_encoder else "")
    device = torch.device(device) if device is not None else pick_device(cfg.device)
    return plan(title, measure(cfg, configs), choices, device, cfg.mixed_precision, cfg.optimizer,
                lora_rank=0 if cfg.lora_rank else SUGGESTED_LORA_RANK)
