"""Loading models, in one place: a VAE or a Stable Diffusion pipeline from a hub id, a diffusers folder, a run folder
of 02/03 (whose `final/` holds the result: a model, or a LoRA adapter over the base model it names), or one
`.safetensors` / `.ckpt` file as AUTOMATIC1111 and ComfyUI use them. Every stage loads through here, so each accepts
the same forms.

A single file holds weights only: its configuration (and a pipeline's tokenizer and scheduler) comes from `config`,
a folder (offline) or a hub id of the base model it was made from (the notebooks' `model_config`). With `config=''`
diffusers guesses the hub repository from the file's keys and downloads its configuration (needs the network).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from sdnb.runtime import weights_dtype

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LORA_META = "sdnb_lora.json"  # beside pytorch_lora_weights.safetensors: the base model a LoRA run adapts
RUN_META = "sdnb_run.json"  # in a 03 run's final/: the run and the training data it came from (04 reads it)
CONFIG_HINT = "set model_config to the base model's folder or hub id, e.g. 'stable-diffusion-v1-5/stable-diffusion-v1-5'"


def is_hub_id(ref: str) -> bool:
    """True for a string shaped like a hub id ('owner/name') that is not an existing local path."""
    return bool(_HUB_ID.match(str(ref))) and not Path(ref).exists()


def is_single_file(ref: str | Path) -> bool:
    """True for a path or URL naming one weights file (.safetensors, .ckpt, ...), not a folder or a hub id."""
    return str(ref).lower().endswith(SINGLE_FILE_SUFFIXES) and not Path(ref).is_dir()


def vae_dir(ref: str | Path, subfolder: str = "vae", parameter: str = "model_id") -> Path:
    """The diffusers VAE folder in a run folder (02: `final`; 03: `final/vae`), a pipeline folder or a VAE folder."""
    path = Path(ref)
    for candidate in (path / "final" / subfolder, path / "final", path / subfolder, path):
        config = candidate / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("_class_name") == "AutoencoderKL":
            return candidate
    raise FileNotFoundError(f"{parameter}={str(ref)!r}: no VAE there (looked for the config.json of an AutoencoderKL "
                            f"in final/{subfolder}, final/, {subfolder}/ and the folder)")


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
    raise FileNotFoundError(f"{parameter}={ref!r} is neither a pipeline folder, a run folder of 03, a single "
                            ".safetensors/.ckpt file nor a hub id")


def lora_dir(ref: str | Path) -> Path | None:
    """The folder holding a LoRA run's adapter (`final/` of a 03 run with lora_rank > 0, or the folder itself), or None."""
    path = Path(ref)
    return next((c for c in (path / "final", path) if (c / LORA_META).is_file()), None) if path.is_dir() else None


def _single_file_source(config: str, kind: str, subfolder: str) -> dict:
    """`from_single_file` arguments naming where the configuration comes from (see the module docstring)."""
    if not config:
        return {}
    if Path(config).is_dir():
        folder = vae_dir(config, subfolder or "vae", "model_config") if kind == "vae" else pipeline_dir(config, "model_config")
        return {"config": str(folder), "local_files_only": True}
    if is_hub_id(config):
        return {"config": config, **({"subfolder": subfolder} if kind == "vae" and subfolder else {})}
    raise FileNotFoundError(f"model_config={config!r} is neither a folder nor a hub id: {CONFIG_HINT}")


def from_single_file(cls: type, ref: str | Path, config: str = "", subfolder: str = "vae", parameter: str = "model_id",
                     **kwargs):
    """`cls.from_single_file(ref)` (an AutoencoderKL or a StableDiffusionPipeline) with its configuration from
    `config`; errors name `parameter` and say what to set."""
    if "://" not in str(ref) and not Path(ref).is_file():
        raise FileNotFoundError(f"{parameter}={str(ref)!r}: no such file")
    source = _single_file_source(config, "vae" if cls is AutoencoderKL else "pipeline", subfolder)
    try:
        return cls.from_single_file(str(ref), **source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        found = f"with model_config={config!r}" if config else "without model_config (diffusers guessed it)"
        raise ValueError(f"{parameter}={str(ref)!r} could not be loaded as a single file {found}: {err}. Is it a "
                         f"Stable Diffusion v1 file? {CONFIG_HINT}") from err


def load_vae(ref: str, subfolder: str = "vae", device: torch.device | str = "cpu", parameter: str = "model_id",
             config: str = "") -> AutoencoderKL:
    """An `AutoencoderKL` in eval mode, frozen: from a hub id (its `subfolder`), a pipeline folder, a VAE folder, a run
    folder of 02/03, or a single file (a standalone VAE or a whole checkpoint; configuration from `config`). Fails
    naming `parameter` when there is no VAE."""
    if is_single_file(ref):
        vae = from_single_file(AutoencoderKL, ref, config, subfolder, parameter)
    elif Path(ref).is_dir():
        vae = AutoencoderKL.from_pretrained(vae_dir(ref, subfolder, parameter))
    elif is_hub_id(ref):
        vae = AutoencoderKL.from_pretrained(ref, subfolder=subfolder or None)
    else:
        raise FileNotFoundError(f"{parameter}={ref!r} is neither a folder, a single .safetensors/.ckpt file nor a hub "
                                "id like 'CompVis/stable-diffusion-v1-4'")
    return vae.to(device).eval().requires_grad_(False)


def load_pipeline(ref: str, device: torch.device | str = "cpu", precision: str = "no", parameter: str = "model_id",
                  vae: str = "", config: str = "") -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` on `device`, in half precision on a GPU when `precision` says so (see
    `runtime.weights_dtype`), with another VAE when `vae` names one (a 02 run folder, a VAE folder or file).

    `ref` may be a LoRA run of 03: its base model (as the run recorded it) with the adapter loaded. A single file
    takes its configuration from `config`. The safety checker is off so that no sample is replaced by a black image;
    progress bars are off."""
    lora = lora_dir(ref)
    if lora is not None:
        return _load_with_lora(lora, device, precision, parameter, vae)
    dtype = weights_dtype(precision, device)
    extra = {"vae": load_vae(vae, parameter="vae_path", config=config).to(dtype=dtype)} if vae else {}
    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False, **extra)
    if is_single_file(ref):
        pipe = from_single_file(StableDiffusionPipeline, ref, config, "", parameter, **common)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir(ref, parameter), **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_with_lora(folder: Path, device: torch.device | str, precision: str, parameter: str,
                    vae: str) -> StableDiffusionPipeline:
    """The base pipeline a LoRA run names in its sdnb_lora.json, with the run's adapter loaded (`load_lora_weights`)."""
    meta = json.loads((folder / LORA_META).read_text())
    try:
        pipe = load_pipeline(meta["model_id"], device, precision, parameter, vae or meta.get("vae_path", ""),
                             meta.get("model_config", ""))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{parameter}={str(folder)!r} is a LoRA adapter over {meta['model_id']!r}, which could "
                                f"not be loaded: {err}") from err
    pipe.load_lora_weights(str(folder))
    return pipe
