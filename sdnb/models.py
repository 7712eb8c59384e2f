"""Loading models, in one place: a VAE or a Stable Diffusion pipeline from a hub id, a diffusers folder or a run
folder of 02/03 (whose `final/` holds the result). Every stage loads through here, so each accepts the same forms."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from sdnb.runtime import weights_dtype

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def is_hub_id(ref: str) -> bool:
    """True for a string shaped like a hub id ('owner/name') that is not an existing local path."""
    return bool(_HUB_ID.match(str(ref))) and not Path(ref).exists()


def load_vae(ref: str, subfolder: str = "vae", device: torch.device | str = "cpu",
             parameter: str = "model_id") -> AutoencoderKL:
    """An `AutoencoderKL` in eval mode, frozen: from a hub id (its `subfolder`), a pipeline folder, a VAE folder or a
    run folder of 02/03. Fails naming `parameter` when a folder holds no VAE."""
    path = Path(ref)
    if path.is_dir():
        for candidate in (path / "final" / subfolder, path / "final", path / subfolder, path):
            if (candidate / "config.json").is_file():
                return AutoencoderKL.from_pretrained(candidate).to(device).eval().requires_grad_(False)
        raise FileNotFoundError(f"{parameter}={ref!r}: no VAE there (looked for config.json in final/, {subfolder}/ "
                                "and the folder)")
    if not is_hub_id(ref):
        raise FileNotFoundError(f"{parameter}={ref!r} is neither a folder nor a hub id like 'CompVis/stable-diffusion-v1-4'")
    vae = AutoencoderKL.from_pretrained(ref, subfolder=subfolder or None)
    return vae.to(device).eval().requires_grad_(False)


def pipeline_dir(ref: str, parameter: str = "model_id") -> str:
    """A run folder of 03 -> its `final/`; a pipeline folder as is; a hub id as is. Fails naming `parameter`."""
    path = Path(ref)
    if path.is_dir():
        for candidate in (path / "final", path):
            if (candidate / "model_index.json").is_file():
                return str(candidate)
        raise FileNotFoundError(f"{parameter}={ref!r}: no diffusers pipeline there "
                                "(looked for model_index.json in final/ and in the folder)")
    if is_hub_id(ref):
        return ref
    raise FileNotFoundError(f"{parameter}={ref!r} is neither a pipeline folder, a run folder of 03 nor a hub id")


def load_pipeline(ref: str, device: torch.device | str = "cpu", precision: str = "no", parameter: str = "model_id",
                  vae: str = "") -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` on `device`, in half precision on a GPU when `precision` says so (see
    `runtime.weights_dtype`), with another VAE when `vae` names one (a 02 run folder or a VAE folder). The safety
    checker is off so that no sample is replaced by a black image; progress bars are off."""
    dtype = weights_dtype(precision, device)
    extra = {"vae": load_vae(vae, parameter="vae_path").to(dtype=dtype)} if vae else {}
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir(ref, parameter), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
