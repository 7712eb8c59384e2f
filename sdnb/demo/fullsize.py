"""The real model shapes of what sdnb loads by default, as config dicts: random-initialised models of these shapes
(`python -m sdnb.tiny DIR --full-size`) run the notebooks at real scale offline.

Sources (the public ``config.json`` files these dicts copy; keys that only record versions are left out):

- SD v1.5: https://huggingface.co/runwayml/stable-diffusion-v1-5 (mirror: stable-diffusion-v1-5/stable-diffusion-v1-5),
  ``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json`` (CLIP ViT-L/14's text tower, as in
  openai/clip-vit-large-patch14), ``scheduler/scheduler_config.json`` (PNDM). The same shapes appear in diffusers'
  ``scripts/convert_original_stable_diffusion_to_diffusers.py`` (v1-inference.yaml) and in open-mmlab/mmagic's
  ``configs/stable_diffusion/stable-diffusion_ddim_denoisingunet.py``.
  Parameters: UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480.
- BLIP-base captioner: https://huggingface.co/Salesforce/blip-image-captioning-base ``config.json`` (ViT-B/16 at
  384 px, BERT-base text decoder, vocabulary 30524 = bert-base-uncased + [DEC] + [ENC]); ~224 M parameters.
- CLIP ViT-L/14 (04's CLIP score): https://huggingface.co/openai/clip-vit-large-patch14 ``config.json``; ~428 M.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdnb.demo.blip import write_blip
from sdnb.demo.clip import build_tiny_clip
from sdnb.demo.models import _drop_load_time_keys, write_clip_tokenizer_files
from sdnb.demo.sets import write_scope
from sdnb.demo.tiny import TinyAssets, stamp_matches, write_fundus, write_photos
from sdnb.demo.tiny import main as tiny_main

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,  # diffusers' default, as SD v1 was trained with (the hub file predates the key)
}

# SD v1.5's text_encoder/config.json (its bos/eos/pad ids 0/2/1 are as shipped; with eos_token_id 2, transformers
# pools at the highest token id, i.e. at <|endoftext|> 49407, as CLIP did).
SD15_TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER = {  # scheduler/scheduler_config.json: PNDMScheduler (load with `from_config`: it ignores clip_sample)
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD15_TOKENIZER_MAX_LENGTH = 77

BLIP_BASE = {
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "bos_token_id": 30522,
        "sep_token_id": 102,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 384,
        "patch_size": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
        "initializer_range": 0.02,
    },
    "projection_dim": 512,
    "image_text_hidden_size": 256,
    "logit_scale_init_value": 2.6592,
}
BLIP_BASE_IMAGE_SIZE = 384

CLIP_VIT_L14 = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}
CLIP_VIT_L14_IMAGE_SIZE = 224

# Parameter counts of the real checkpoints (what a model built from these dicts must have).
PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "blip": 223_971_644,
          "clip": 427_616_513}


# ---- the writer: `python -m sdnb.tiny DIR --full-size` ------------------------------------------------------------

FULL_VERSION = 1
FULL_STAMP = ".sdnb-full.json"


def full_assets_at(out_dir: str | Path) -> TinyAssets:
    """The paths `build_full(out_dir)` writes: the same fields as the tiny build, real shapes."""
    root = Path(out_dir)
    return TinyAssets(root, root / "sd15", root / "blip-base", root / "fundus" / "train", root / "fundus" / "val",
                      root / "photos", root / "clip-vit-l14", root / "scope")


def _save(model, folder: Path) -> int:
    """`save_pretrained` in fp32 safetensors; returns the parameter count."""
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def write_sd_full(out: Path, seed: int = 0, progress: bool = True) -> dict:
    """SD v1.5's shapes, random-initialised, in the hub layout (`model_index.json`, unet/, vae/, text_encoder/,
    tokenizer/, scheduler/). One model is built, saved and freed at a time (the UNet alone is 3.4 GB in fp32)."""
    write_clip_tokenizer_files(out / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer", model_max_length=SD15_TOKENIZER_MAX_LENGTH)
    tokenizer.save_pretrained(out / "tokenizer")
    _drop_load_time_keys(out / "tokenizer" / "tokenizer_config.json")
    PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(out / "scheduler")
    builders = {"text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
                "vae": lambda: AutoencoderKL(**SD15_VAE), "unet": lambda: UNet2DConditionModel(**SD15_UNET)}
    counts = {}
    for i, (name, make) in enumerate(tqdm(builders.items(), desc="full-size SD v1.5", disable=not progress)):
        torch.manual_seed(seed + 1 + i)
        model = make()
        counts[name] = _save(model, out / name)
        del model
        gc.collect()
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return counts


def is_full_built(out_dir: str | Path, seed: int = 0) -> bool:
    """True if `out_dir` holds a complete full-size build of this version with this seed."""
    return stamp_matches(Path(out_dir) / FULL_STAMP, FULL_VERSION, seed)


def build_full(out_dir: str | Path, seed: int = 0, force: bool = False, progress: bool = True) -> TinyAssets:
    """Write random-initialised SD v1.5, BLIP-base and CLIP ViT-L/14 (fp32, ~5.6 GB) with the tiny build's images
    under `out_dir`, or return at once if there. Peak memory is about one model (the UNet: ~3.5 GB)."""
    a = full_assets_at(out_dir)
    if not force and is_full_built(a.root, seed):
        return a
    a.root.mkdir(parents=True, exist_ok=True)
    (a.root / FULL_STAMP).unlink(missing_ok=True)
    for d in (a.sd, a.blip, a.fundus_train.parent, a.photos, a.clip, a.scope):
        shutil.rmtree(d, ignore_errors=True)
    write_photos(a.photos)
    write_scope(a.scope)
    write_fundus(a.fundus_train.parent)
    counts = write_sd_full(a.sd, seed, progress)
    write_blip(a.blip, seed=seed, image_size=BLIP_BASE_IMAGE_SIZE, steps=0, progress=progress, shapes=BLIP_BASE)
    gc.collect()
    build_tiny_clip(a.sd / "tokenizer", a.clip, None, seed=seed, shapes=CLIP_VIT_L14, image_size=CLIP_VIT_L14_IMAGE_SIZE)
    gc.collect()
    counts.update(blip=_count(a.blip / "model.safetensors"), clip=_count(a.clip / "model.safetensors"))
    tmp = a.root / (FULL_STAMP + ".tmp")
    tmp.write_text(json.dumps({"version": FULL_VERSION, "seed": seed, "parameters": counts}, indent=2))
    tmp.replace(a.root / FULL_STAMP)
    return a


def _count(weights: Path) -> int:
    """Parameters stored in a safetensors file (tied weights once)."""
    with safe_open(str(weights), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def main(argv: list[str] | None = None) -> TinyAssets:
    """``python -m sdnb.tiny OUT_DIR [--full-size] [--seed N] [--force]``: the tiny build, or with ``--full-size``
    the real shapes (random weights, ~5.6 GB on disk, ~4 GB of memory while writing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--full-size" not in argv:
        return tiny_main(argv)
    argv.remove("--full-size")
    parser = argparse.ArgumentParser(prog="python -m sdnb.tiny --full-size", description=main.__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the full-size models and images into")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    args = parser.parse_args(argv)
    assets = build_full(args.out_dir, seed=args.seed, force=args.force)
    for field in ("root", "sd", "blip", "clip", "fundus_train", "fundus_val", "photos"):
        print(f"{field:13s} {getattr(assets, field)}")
    return assets
