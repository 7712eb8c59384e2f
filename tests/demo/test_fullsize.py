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


def test_full_runs_set_only_parameters_the_notebooks_have(tmp_path):
    """`make test-full`'s runs (checked without running them): every parameter is one of the notebook's."""
    import nbformat

    from sdnb.demo.full import full_runs
    from sdnb.demo.run import REPO_NOTEBOOKS

    runs = full_runs(fullsize.full_assets_at(tmp_path), tmp_path)
    assert [label for label, *_ in runs].count("03_sd_finetune resume +1") == 1
    for _, notebook, params in runs:
        cell = next(c for c in nbformat.read(str(REPO_NOTEBOOKS / f"{notebook}.ipynb"), as_version=4).cells
                    if "parameters" in c.metadata.get("tags", []))
        names = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
        assert set(params) <= names, set(params) - names


def test_peak_memory_counts_the_child_processes():
    import subprocess
    import sys

    from sdnb.demo.full import PeakMemory

    with PeakMemory(interval=0.05) as mem:
        subprocess.run([sys.executable, "-c", "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                        "time.sleep(0.5)"], check=True)
    assert mem.peak > 300 * 2**20
