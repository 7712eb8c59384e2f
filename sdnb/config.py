"""One validated config object per notebook, built from its parameters cell and saved as run_dir/config.json.

Each field carries its accepted range; a bad value fails with a `ConfigError` that names the parameter,
the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints


class ConfigError(ValueError):
    """A notebook parameter has a value outside its accepted range."""


def param(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
          choices: tuple | None = None, multiple_of: int | None = None, pattern: str | None = None,
          help: str = "") -> Any:
    """A config field with its accepted range (checked by `validate`)."""
    meta = dict(ge=ge, gt=gt, le=le, choices=choices, multiple_of=multiple_of, pattern=pattern, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


def _describe(kind: type, meta: Mapping) -> str:
    parts = [{int: "an integer", float: "a number", str: "a string", bool: "True or False", list: "a list"}.get(kind, str(kind))]
    if meta.get("choices"):
        parts = ["one of " + ", ".join(repr(c) for c in meta["choices"])]
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']}")
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']}")
    if meta.get("multiple_of"):
        parts.append(f"a multiple of {meta['multiple_of']}")
    if meta.get("pattern"):
        parts.append(f"matching {meta['pattern']}")
    return " ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if parts[1:] else "")


def _check(name: str, value: Any, kind: Any, meta: Mapping) -> Any:
    """Return the value coerced to its kind, or raise ConfigError naming the parameter."""
    base = getattr(kind, "__origin__", kind)
    optional = base is not None and "None" in str(kind)
    if value is None and optional:
        return None
    if optional:  # Optional[X] written as `X | None`
        base = next(a for a in kind.__args__ if a is not type(None))
        base = getattr(base, "__origin__", base)
    bad = ConfigError(f"{name}={value!r} is not accepted: expected {_describe(base, meta)}"
                      + (f" ({meta['help']})" if meta.get("help") else ""))
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise bad
        value = int(value)
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise bad
    elif base in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        value = list(value)
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise bad
    if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], value):
        raise bad
    if isinstance(value, (int, float)):
        if (meta.get("ge") is not None and value < meta["ge"]) or (meta.get("gt") is not None and value <= meta["gt"]) \
                or (meta.get("le") is not None and value > meta["le"]):
            raise bad
        if meta.get("multiple_of") and value % meta["multiple_of"]:
            raise bad
    return value


@dataclass
class BaseConfig:
    """Parameters every notebook shares."""

    stage: ClassVar[str] = "base"

    run_dir: str = param("runs/run", pattern=r".+", help="everything the notebook writes goes under it")
    sync_dir: str = param("", help="mirror of checkpoints, e.g. /content/drive/MyDrive/sdnb; '' = off")
    seed: int = param(0, ge=0)
    device: str = param("auto", pattern=r"auto|cpu|mps|cuda(:\d+)?")
    mixed_precision: str = param("auto", choices=("auto", "no", "fp16", "bf16"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check and coerce every field; raise ConfigError naming the first bad parameter."""
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check(f.name, getattr(self, f.name), hints[f.name], f.metadata))

    @classmethod
    def from_namespace(cls, namespace: Mapping[str, Any]) -> "BaseConfig":
        """Build the config from a notebook's variables (the parameters cell): `Config.from_namespace(globals())`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in namespace.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The config as plain JSON-able values, with its stage."""
        return {"stage": self.stage, **dataclasses.asdict(self)}

    @property
    def path(self) -> Path:
        """The run folder."""
        return Path(self.run_dir)

    def save(self) -> Path:
        """Write run_dir/config.json and return its path."""
        self.path.mkdir(parents=True, exist_ok=True)
        out = self.path / "config.json"
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        tmp.replace(out)
        return out

    @classmethod
    def load(cls, path: str | Path) -> "BaseConfig":
        """Read a saved config.json back (the stage key is checked)."""
        data = json.loads(Path(path).read_text())
        stage = data.pop("stage", cls.stage)
        if stage != cls.stage:
            raise ConfigError(f"{path} is a {stage!r} config, not {cls.stage!r}")
        return cls(**data)

    def __str__(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"{f.name:<{width}} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self))


@dataclass
class TrainConfig(BaseConfig):
    """The training loop's parameters (the names `sdnb.train.TrainSettings` reads), shared by 02 and 03."""

    max_steps: int = param(1000, ge=1, help="optimizer steps in total, counting from the run's start")
    max_epochs: int = param(0, ge=0, help="0 = budget in steps only")
    batch_size: int = param(4, ge=1, help="micro-batch per process")
    grad_accum: int = param(1, ge=1, help="micro-batches per optimizer step")
    optimizer: str = param("adamw", choices=("adamw", "radam", "adamw8bit"))
    lr: float = param(1e-4, gt=0, le=1)
    weight_decay: float = param(0.0, ge=0)
    adam_betas: list = param([0.9, 0.999])
    lr_scheduler: str = param("constant", choices=("constant", "constant_with_warmup", "linear", "cosine",
                                                   "cosine_with_restarts", "polynomial"))
    warmup_steps: int = param(0, ge=0)
    max_grad_norm: float = param(1.0, ge=0, help="0 = no clipping")
    ema: bool = param(False)
    ema_decay: float = param(0.9999, gt=0, le=1)
    log_every: int = param(10, ge=1)
    validate_every: int = param(0, ge=0, help="0 = at the end only")
    sample_every: int = param(0, ge=0)
    checkpoint_every: int = param(500, ge=0, help="0 = off")
    checkpoint_minutes: float = param(30.0, ge=0, help="0 = off")
    keep_checkpoints: int = param(2, ge=1)
    resume: str = param("", help="'' = new run, 'latest', or a checkpoint folder")
    nan_patience: int = param(5, ge=1)
    num_workers: int = param(0, ge=0)
    log_with: str = param("", choices=("", "tensorboard", "wandb"))

    def validate(self) -> None:
        super().validate()
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas={self.adam_betas!r} is not accepted: expected two numbers in [0, 1)")


@dataclass
class CaptionConfig(BaseConfig):
    """01_captioning: scan a folder of photos, caption them with BLIP, write training copies."""

    stage: ClassVar[str] = "caption"

    image_dir: str = param("data/unsplash-lite/photos", pattern=r".+", help="folder of photos (searched recursively)")
    captioner_id: str = param("Salesforce/blip-image-captioning-base", pattern=r".+")
    fetch_unsplash: bool = param(False, help="download Unsplash Lite photos into image_dir first")
    data_dir: str = param("data", pattern=r".+", help="where the Unsplash Lite metadata is downloaded")
    unsplash_photos: int = param(500, ge=1, help="photos to fetch, chosen reproducibly by seed")
    unsplash_width: int = param(1024, ge=64, help="fetched photos are at most this wide")
    long_side: int = param(1024, ge=64, help="training copies are shrunk to this long side (never enlarged)")
    jpeg_quality: int = param(90, ge=1, le=100, help="JPEG quality of the training copies")
    batch_size: int = param(8, ge=1, help="images captioned at once")
    num_beams: int = param(16, ge=1, help="beam search width (ignored when top_p is set)")
    min_length: int = param(30, ge=0, help="tokens generated at least, after the prompt")
    max_length: int = param(48, ge=1, help="tokens generated at most, after the prompt")
    repetition_penalty: float = param(1.4, gt=0, help="the report's q_factor; 1.0 = no penalty")
    top_p: float | None = param(None, gt=0, le=1, help="nucleus sampling instead of beam search; None = beams")
    prompt: str = param("", help="text BLIP continues from, kept in the caption, e.g. 'a photograph of'")
    prefix: str = param("", help="text put before every caption")
    suffix: str = param(" unsplash photography", help="text put after every caption")
    sweep_images: int = param(5, ge=0, help="sample size of the settings sweep; 0 = no sweep")
    sweep_grid: dict = param({"repetition_penalty": [1.0, 1.4], "min_length": [5, 30]},
                             help="generation parameter -> values to try")
    overwrite: bool = param(False, help="regenerate every caption, even existing or edited ones")

    GENERATION: ClassVar[tuple[str, ...]] = ("num_beams", "min_length", "max_length", "repetition_penalty", "top_p",
                                             "prompt", "prefix", "suffix", "seed")

    def validate(self) -> None:
        super().validate()
        if self.min_length > self.max_length:
            raise ConfigError(f"min_length={self.min_length} is not accepted: expected <= max_length={self.max_length}")
        if not isinstance(self.sweep_grid, dict):
            raise ConfigError(f"sweep_grid={self.sweep_grid!r} is not accepted: expected a dict of lists")
        for name, values in self.sweep_grid.items():
            if name not in self.GENERATION or not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep_grid={self.sweep_grid!r} is not accepted: expected keys among "
                                  f"{', '.join(self.GENERATION)}, each with a non-empty list of values (bad: {name!r})")

    def generation(self) -> dict[str, Any]:
        """The captioner's generation parameters (``Captioner.caption`` keywords)."""
        return {name: getattr(self, name) for name in self.GENERATION}


# Named VAE recipes (REFERENCES.md section 1). Every value shows in 02's parameters cell; None there = the recipe's.
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
    model_id: str = param("CompVis/stable-diffusion-v1-4", pattern=r".+")
    model_subfolder: str = param("vae", help="'' when model_id is a VAE folder itself")
    patch_size: int = param(512, ge=16, multiple_of=8)
    patches_per_epoch: int = param(1000, ge=1, help="random patches drawn per epoch")
    n_val_patches: int = param(64, ge=1, help="fixed held-out patches for the metrics")
    recipe: str = param("sdnb", choices=tuple(VAE_RECIPES), help="fills every value left at None")
    trainable: str | None = param(None, choices=("all", "decoder"))
    optimizer: str | None = param(None, choices=("adamw", "radam", "adamw8bit"))
    lr: float | None = param(None, gt=0, le=1)
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

    def validate(self) -> None:
        recipe = VAE_RECIPES.get(self.recipe)
        if recipe is None:
            raise ConfigError(f"recipe={self.recipe!r} is not accepted: expected one of {', '.join(VAE_RECIPES)}")
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().validate()
        if self.cache_latents and self.trainable != "decoder":
            raise ConfigError("cache_latents=True is not accepted with trainable='all': cached latents need a frozen "
                              "encoder (set trainable='decoder' or recipe='ft-mse')")


@dataclass
class SDConfig(TrainConfig):
    """03_sd_finetune: fine-tune SD 1.5's UNet on captioned images."""

    stage: ClassVar[str] = "sd"

    data_dir: str = param("runs/01_captioning/train", pattern=r".+", help="images with .txt caption sidecars")
    model_id: str = param("stable-diffusion-v1-5/stable-diffusion-v1-5", pattern=r".+")
    vae_path: str = param("", help="a fine-tuned VAE (a 02 run folder or a VAE folder); '' = the base VAE")
    resolution: int = param(512, ge=64, multiple_of=64)
    val_fraction: float = param(0.1, ge=0, le=0.5, help="share of the images held out, by image, seeded")
    crop_jitter: float = param(0.02, ge=0, le=0.2, help="random crop shrink and shift, share of the short side")
    flip: bool = param(False, help="random horizontal flips")
    caption_dropout: float = param(0.0, ge=0, le=1, help="share of steps trained with an empty caption")
    cache_latents: bool = param(False, help="encode images and captions once (needs crop_jitter=0, flip=False)")
    train_text_encoder: bool = param(False)
    text_encoder_lr: float = param(5e-7, gt=0, le=1)
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
    # the training loop's fields, with EveryDream2's defaults (the seed's recipe)
    lr: float = param(1e-6, gt=0, le=1)
    optimizer: str = param("auto", choices=("auto", "adamw", "radam", "adamw8bit"),
                           help="auto = 8-bit AdamW on a GPU with bitsandbytes, else AdamW")
    weight_decay: float = param(0.01, ge=0)
    batch_size: int = param(2, ge=1)
    max_steps: int = param(0, ge=0, help="0 = budget in epochs only")
    max_epochs: int = param(30, ge=0)
    validate_every: int = param(300, ge=0, help="0 = at the end only")
    checkpoint_every: int = param(500, ge=0, help="0 = off")

    def validate(self) -> None:
        super().validate()
        if self.max_steps == 0 and self.max_epochs == 0:
            raise ConfigError("max_steps=0 and max_epochs=0: set at least one training budget")
        if self.cache_latents and (self.crop_jitter > 0 or self.flip):
            raise ConfigError(f"cache_latents=True is not accepted with crop_jitter={self.crop_jitter} or "
                              f"flip={self.flip}: cached latents cannot vary (set crop_jitter=0 and flip=False)")
        if not all(isinstance(p, str) for p in self.sample_prompts):
            raise ConfigError(f"sample_prompts={self.sample_prompts!r} is not accepted: expected a list of strings")
        if not self.sample_cfg_scales or not all(isinstance(c, (int, float)) and c >= 1 for c in self.sample_cfg_scales):
            raise ConfigError(f"sample_cfg_scales={self.sample_cfg_scales!r} is not accepted: expected numbers >= 1")


@dataclass
class CompareConfig(BaseConfig):
    """04_compare: base vs fine-tuned, side by side and in numbers."""

    stage: ClassVar[str] = "compare"

    base_model_id: str = param("stable-diffusion-v1-5/stable-diffusion-v1-5", pattern=r".+")
    finetuned_model: str = param("runs/03_sd_finetune/final", help="a run folder of 03, a pipeline folder or a hub id")
    base_vae: str = param("CompVis/stable-diffusion-v1-4", help="hub id or folder (subfolder 'vae' is tried)")
    finetuned_vae: str = param("runs/02_vae_finetune/final", help="a run folder of 02 or a VAE folder")
    image_dir: str = param("data/FIVES/test/Original", help="held-out images for the VAE comparison")
    SCHEDULER_NAMES: ClassVar[tuple[str, ...]] = ("ddim", "pndm", "euler", "euler_a", "dpm++2m", "lms", "unipc")
    XYZ_AXES: ClassVar[tuple[str, ...]] = ("cfg", "steps", "checkpoint", "scheduler", "seed")
    control_vae: str = param("", help="a VAE trained as many steps on other (e.g. natural) images; '' = none")
    patch_size: int = param(512, ge=8, multiple_of=8, help="held-out patches; whole images if all are this size or less")
    n_patches: int = param(64, ge=2, help="fixed held-out patches (rFID wants >= 50)")
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
    scheduler: str = param("", choices=("", *SCHEDULER_NAMES), help="'' = the pipeline's own")
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
                k not in self.XYZ_AXES or not isinstance(v, (list, tuple)) or not v for k, v in axes.items()):
            raise ConfigError(f"xyz_axes={axes!r} is not accepted: expected a dict of 1-3 axes among "
                              f"{', '.join(self.XYZ_AXES)}, each with a non-empty list of values")
        bad = [v for v in axes.get("scheduler", []) if v not in ("", *self.SCHEDULER_NAMES)]
        bad += [v for k in ("cfg", "steps", "seed") for v in axes.get(k, []) if not isinstance(v, (int, float))]
        if bad:
            raise ConfigError(f"xyz_axes={axes!r} is not accepted: bad values {bad} (schedulers: "
                              f"{', '.join(self.SCHEDULER_NAMES)}; cfg, steps, seed: numbers)")
        if not all(isinstance(p, str) for p in self.prompts):
            raise ConfigError(f"prompts={self.prompts!r} is not accepted: expected a list of strings")
