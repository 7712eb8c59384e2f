"""The full-size shapes (`python -m sdnb.tiny DIR --full-size`) are the real ones: the same parameter counts as the
published SD v1.5, BLIP-base and CLIP ViT-L/14 checkpoints (models built on the meta device: no memory, no time)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

from sdnb.demo import fullsize

BUILDERS = {
    "unet": lambda: UNet2DConditionModel(**fullsize.SD15_UNET),
    "vae": lambda: AutoencoderKL(**fullsize.SD15_VAE),
    "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**fullsize.SD15_TEXT_ENCODER)),
    "blip": lambda: BlipForConditionalGeneration(BlipConfig(**fullsize.BLIP_BASE)),
    "clip": lambda: CLIPModel(CLIPConfig(**fullsize.CLIP_VIT_L14)),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_size_shapes_have_the_published_parameter_counts(name):
    with torch.device("meta"):
        model = BUILDERS[name]()
    assert sum(p.numel() for p in model.parameters()) == fullsize.PARAMS[name]


def test_sd15_scheduler_is_pndm_with_sd_v1_betas():
    scheduler = PNDMScheduler.from_config(fullsize.SD15_SCHEDULER)
    assert scheduler.config.skip_prk_steps and scheduler.config.steps_offset == 1
    assert scheduler.betas[0].item() == pytest.approx(0.00085) and scheduler.betas[-1].item() == pytest.approx(0.012)


def test_full_size_cli_without_the_flag_is_the_tiny_build(tiny_assets):
    assert fullsize.main([str(tiny_assets.root)]) == tiny_assets
