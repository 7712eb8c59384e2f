"""Single ``.safetensors`` files that AUTOMATIC1111 and ComfyUI load, written from diffusers folders.

The fine-tuned models are diffusers folders; the UIs load the original (CompVis "LDM") layout of Stable
Diffusion v1 instead:

- a standalone VAE (A1111 ``models/VAE``, ComfyUI ``models/vae``): the LDM ``AutoencoderKL`` names with no
  prefix, ``encoder.down.0.block.0.norm1.weight`` ... ``decoder.mid.attn_1.q.weight`` (a 1x1 conv,
  [C, C, 1, 1]), ``quant_conv.*``, ``post_quant_conv.*``; A1111 puts it into
  ``model.first_stage_model.load_state_dict`` (modules/sd_vae.py), ComfyUI into its LDM ``AutoencoderKL``
  (comfy/sd.py ``VAE``);
- a whole SD v1 checkpoint: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (the VAE names
  above) and ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder, transformers names).

The names follow diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and the reverse
mapping that ``from_single_file`` runs (diffusers/loaders/single_file_utils.py), written here for any number
of blocks and layers, so the tiny test models convert the same way as SD 1.5. Reading such files back is
`sdnb.models`' job (diffusers' ``from_single_file``, with the configuration from a folder or hub id).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import save_file

from sdnb.models import pipeline_dir, vae_dir

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
_RESNET_UNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_RESNET_VAE = {"conv_shortcut": "nin_shortcut"}
# diffusers' current attention names, then the legacy ones it still reads
_ATTN_VAE = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
             "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_SAME = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


def _rename(suffix: str, table: dict[str, str]) -> str:
    """`suffix` with its leading module name (one or two dotted parts) renamed through `table`."""
    for old in sorted(table, key=len, reverse=True):
        if suffix.startswith(old + "."):
            return table[old] + suffix[len(old):]
    return suffix


def _indices(keys, pattern: str) -> dict[int, set[int]]:
    """For keys matching `pattern` (two integer groups): first group -> set of second-group values."""
    found: dict[int, set[int]] = {}
    for key in keys:
        m = re.match(pattern, key)
        if m:
            found.setdefault(int(m[1]), set()).add(int(m[2]))
    return found


def _convert(state_dict: dict, rules: list[tuple[str, Callable]], what: str) -> dict[str, torch.Tensor]:
    """Rename every key through the first matching (regex, function of the match) rule; unknown keys fail."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        for pattern, build in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[build(m)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{what}: {len(unknown)} keys have no place in the SD v1 layout, e.g. {unknown[:5]}; "
                         "is this a Stable Diffusion v1 model?")
    return out


def vae_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKL` weights -> the LDM names of a standalone VAE file (no prefix).

    Decoder blocks are numbered the other way round in LDM (``up.{n-1-i}``); the mid-block attention's
    linear weights become 1x1 convolutions.
    """
    n_up = len(_indices(state_dict, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."))
    rules = [
        (r"(quant_conv|post_quant_conv)\.(.+)", lambda m: m[0]),
        (r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(.+)", lambda m: f"{m[1]}.{_SAME[m[2]]}.{m[3]}"),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], _RESNET_VAE)}"),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], _RESNET_VAE)}"),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)",
         lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.{m[2]}"),
        (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], _RESNET_VAE)}"),
        (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", lambda m: f"{m[1]}.mid.attn_1.{_rename(m[2], _ATTN_VAE)}"),
    ]
    out = _convert(state_dict, rules, "VAE")
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def _unet_numbering(keys) -> tuple[dict, dict]:
    """LDM block numbers: input_blocks index of each down (block, layer) and (block, "down"); output_blocks
    index of each up (block, layer) and, for (block, "up"), (index, position of the upsampler in it)."""
    down_res, up_res = _indices(keys, r"down_blocks\.(\d+)\.resnets\.(\d+)\."), _indices(keys, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
    has_down = {int(m[1]) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", k))}
    up_attn = {int(m[1]) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    inputs, outputs, index = {}, {}, 1  # input_blocks.0 is conv_in
    for i in sorted(down_res):
        for j in sorted(down_res[i]):
            inputs[i, j], index = index, index + 1
        if i in has_down:
            inputs[i, "down"], index = index, index + 1
    index = 0
    for i in sorted(up_res):
        for j in sorted(up_res[i]):
            outputs[i, j], index = index, index + 1
        outputs[i, "up"] = (index - 1, 2 if i in up_attn else 1)
    return inputs, outputs


def unet_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `UNet2DConditionModel` (SD v1 kind) weights -> LDM ``UNetModel`` names (no prefix).

    ``input_blocks`` / ``output_blocks`` are numbered in the order LDM builds them (resnet [+ attention] per
    layer, then the down/up-sampler), from the blocks present, so any depth or layers-per-block works.
    """
    inp, outp = _unet_numbering(state_dict)
    up = {i: v for (i, tag), v in outp.items() if tag == "up"}
    rules = [
        (r"time_embedding\.linear_(1|2)\.(.+)", lambda m: f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"),
        (r"conv_in\.(.+)", lambda m: f"input_blocks.0.0.{m[1]}"),
        (r"conv_norm_out\.(.+)", lambda m: f"out.0.{m[1]}"),
        (r"conv_out\.(.+)", lambda m: f"out.2.{m[1]}"),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"input_blocks.{inp[int(m[1]), int(m[2])]}.0.{_rename(m[3], _RESNET_UNET)}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m: f"input_blocks.{inp[int(m[1]), int(m[2])]}.1.{m[3]}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda m: f"input_blocks.{inp[int(m[1]), 'down']}.0.op.{m[2]}"),
        (r"mid_block\.resnets\.(\d+)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{_rename(m[2], _RESNET_UNET)}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda m: f"middle_block.1.{m[1]}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
         lambda m: f"output_blocks.{outp[int(m[1]), int(m[2])]}.0.{_rename(m[3], _RESNET_UNET)}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda m: f"output_blocks.{outp[int(m[1]), int(m[2])]}.1.{m[3]}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
         lambda m: "output_blocks.{}.{}.conv.{}".format(*up[int(m[1])], m[2])),
    ]
    return _convert(state_dict, rules, "UNet")


def text_encoder_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CLIPTextModel` weights -> SD v1 names under ``cond_stage_model.transformer.`` (no prefix):
    ``text_model.embeddings...``, ``text_model.encoder.layers...``, ``text_model.final_layer_norm...``.

    transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level; the UIs expect it, so it is
    added back. ``position_ids`` (a buffer, not a weight) is left out.
    """
    rules = [(r"(?:text_model\.)?((embeddings|encoder|final_layer_norm)\..+)", lambda m: f"text_model.{m[1]}")]
    kept = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    return _convert(kept, rules, "text encoder")


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies in `dtype` (floating tensors only), as safetensors wants them."""
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in state_dict.items()}


def pipeline_to_ldm(pipe_or_folder: StableDiffusionPipeline | str | Path,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One SD v1 checkpoint dict (UNet, VAE and text encoder under their LDM prefixes) in `dtype`."""
    pipe = pipe_or_folder
    if not isinstance(pipe, StableDiffusionPipeline):
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir(str(pipe_or_folder), "run_dir"), safety_checker=None,
                                                       requires_safety_checker=False)
    parts = ((UNET_PREFIX, unet_to_ldm(pipe.unet.state_dict())), (VAE_PREFIX, vae_to_ldm(pipe.vae.state_dict())),
             (TEXT_PREFIX, text_encoder_to_ldm(pipe.text_encoder.state_dict())))
    return _cast({prefix + k: v for prefix, sd in parts for k, v in sd.items()}, dtype)


def save_atomic(tensors: dict[str, torch.Tensor], out_path: str | Path, overwrite: bool = False) -> Path:
    """Write `tensors` to `out_path` (.safetensors) through a temporary name; an existing file is kept unless
    `overwrite`."""
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the output file name must end in .safetensors")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_vae(vae_folder_or_run_dir: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
               overwrite: bool = False) -> Path:
    """Write the VAE of a run folder / pipeline / VAE folder as one standalone LDM VAE .safetensors file."""
    vae = AutoencoderKL.from_pretrained(vae_dir(vae_folder_or_run_dir, parameter="run_dir"))
    return save_atomic(_cast(vae_to_ldm(vae.state_dict()), dtype), out_path, overwrite)


def export_pipeline(pipeline_folder_or_run_dir: str | Path, out_path: str | Path,
                    dtype: torch.dtype = torch.float16, overwrite: bool = False) -> Path:
    """Write a run folder's / diffusers folder's SD v1 pipeline as one LDM checkpoint .safetensors file."""
    return save_atomic(pipeline_to_ldm(pipeline_folder_or_run_dir, dtype), out_path, overwrite)
