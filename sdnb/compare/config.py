"""`CompareConfig`: 04_compare's parameters, with the samplers and the X/Y/Z axes it knows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdnb.config import BaseConfig, ConfigError, param

# The samplers a comparison or an X/Y/Z axis may switch to: name -> diffusers class (built from the pipeline's own
# scheduler config).
SCHEDULERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
              "lms": "LMSDiscreteScheduler", "unipc": "UniPCMultistepScheduler"}
# What an X/Y/Z sheet can vary (AUTOMATIC1111's X/Y/Z plot: CFG scale, steps, checkpoint, sampler, seed).
XYZ_AXES = ("cfg", "steps", "checkpoint", "scheduler", "seed")


@dataclass
class CompareConfig(BaseConfig):
    """04_compare: base vs fine-tuned, side by side and in numbers."""

    stage: ClassVar[str] = "compare"

    base_model_id: str = param("stable-diffusion-v1-5/stable-diffusion-v1-5", pattern=r".+")
    model_config: str = param("", help="for single .safetensors/.ckpt files among the models: the base model's folder or "
                                       "hub id holding their configuration; '' = diffusers guesses it (needs the network)")
    finetuned_model: str = param("runs/03_sd_finetune/final",
                                 help="a run folder of 03 (a LoRA run: base + adapter), a pipeline folder or file, a hub id")
    base_vae: str = param("CompVis/stable-diffusion-v1-4", help="hub id or folder (subfolder 'vae' is tried)")
    finetuned_vae: str = param("runs/02_vae_finetune/final", help="a run folder of 02 or a VAE folder")
    image_dir: str = param("data/FIVES/test/Original", help="held-out images for the VAE comparison")
    control_vae: str = param("auto", help="a VAE trained with the same recipe and steps on other (e.g. natural) images; "
                                          "'auto' = the control run of the 02 run in finetuned_vae, if any; '' = none")
    patch_size: int = param(512, ge=8, multiple_of=8, help="held-out patches; whole images if all are this size or less")
    n_patches: int = param(64, ge=2, help="fixed held-out patches (rFID wants >= 50)")
    min_foreground: float = param(0.5, ge=0, le=1, help="share of each held-out patch that must be field of view; 0 = any")
    foreground_threshold: float = param(0.1, gt=0, le=1, help="field of view: blurred luminance above this share of "
                                                              "the image's maximum")
    n_full_images: int = param(1, ge=0, help="whole held-out images reconstructed at full size (tiled) for the browser")
    tile_size: int = param(512, ge=16, multiple_of=8, help="tiles for full-size reconstructions")
    lpips_net: str = param("alex", choices=("alex", "vgg", "squeeze"))
    fid_features: str = param("auto", choices=("auto", "torchmetrics", "fid-helper"))
    n_bootstrap: int = param(1000, ge=0, help="bootstrap resamples of the 95% intervals; 0 = no intervals")
    train_data_dir: str = param("", help="training images (with captions) for FID/KID/KL; '' = data_dir of the 03 run")
    prompts: list = param([], help="[] = the training captions, cycled")
    n_images: int = param(100, ge=2, help="images per pipeline: prompt i % len(prompts), seed seed + i")
    resolution: int = param(512, ge=16, multiple_of=8, help="generated image side")
    num_inference_steps: int = param(30, ge=1)
    guidance_scale: float = param(7.0, ge=0)
    scheduler: str = param("", choices=("", *SCHEDULERS), help="'' = the pipeline's own")
    batch_size: int = param(4, ge=1, help="images per pipeline call")
    xyz_axes: dict = param({"cfg": [1.01, 4.0, 7.0], "steps": [10, 20, 30], "checkpoint": ["base", "finetuned"]},
                           help="x, y, z axes in order: 1-3 of cfg, steps, checkpoint, scheduler, seed")
    xyz_prompt: str = param("", help="'' = the first prompt")
    clip_model_id: str = param("openai/clip-vit-large-patch14", pattern=r".+", help="CLIP for the CLIP score")
    n_clusters: int = param(10, ge=2, help="k-means clusters of the distribution metric")

    def validate(self) -> None:
        super().validate()
        axes = self.xyz_axes
        if not isinstance(axes, dict) or not 1 <= len(axes) <= 3 or any(
                k not in XYZ_AXES or not isinstance(v, (list, tuple)) or not v for k, v in axes.items()):
            raise ConfigError(f"xyz_axes={axes!r} is not accepted: expected a dict of 1-3 axes among "
                              f"{', '.join(XYZ_AXES)}, each with a non-empty list of values")
        bad = [v for v in axes.get("scheduler", []) if v not in ("", *SCHEDULERS)]
        bad += [v for k in ("cfg", "steps", "seed") for v in axes.get(k, []) if not isinstance(v, (int, float))]
        if bad:
            raise ConfigError(f"xyz_axes={axes!r} is not accepted: bad values {bad} (schedulers: "
                              f"{', '.join(SCHEDULERS)}; cfg, steps, seed: numbers)")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError(f"prompts={self.prompts!r} is not accepted: expected a list of strings")
