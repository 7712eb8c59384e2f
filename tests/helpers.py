"""Helpers several test modules share: a LoRA run folder as 03 leaves it, and reading TensorBoard event files."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from sdnb.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, save_lora


def lora_run(sd: Path, run: Path, alpha: float = 8.0, scale: float = 0.5) -> StableDiffusionPipeline:
    """A LoRA run folder as 03 leaves it (final/ with adapters on the UNet and the text encoder over the pipeline `sd`;
    B drawn with std `scale`, so that every delta is non-zero); returns the pipeline holding the adapters."""
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    generator = torch.Generator().manual_seed(0)
    for model, targets in ((pipe.unet, UNET_TARGETS), (pipe.text_encoder, TEXT_TARGETS)):
        add_lora(model, 4, alpha, targets)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)
    (run / "final").mkdir(parents=True)
    save_lora(run / "final", pipe.unet, pipe.text_encoder, {"model_id": str(sd), "model_config": "", "vae_path": ""})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tensorboard_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, int, int]]]]:
    """Scalars {tag: [(step, value)]} and images {tag: [(step, width, height)]} read back from the event files under
    `folder` with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the "dev" extra

    scalars, images = {}, {}
    for events in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        reader = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in reader.Scalars(tag))
        for tag in reader.Tags()["images"]:
            images.setdefault(tag, []).extend((e.step, e.width, e.height) for e in reader.Images(tag))
    return scalars, images
