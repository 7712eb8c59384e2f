"""LoRA adapters (peft) for SD v1's UNet and text encoder: adding them, saving them where `pipe.load_lora_weights`
reads them, and writing them as the kohya-style single file AUTOMATIC1111 and ComfyUI load.

The recipe is diffusers' (examples/text_to_image/train_text_to_image_lora.py): the UNet's attention projections
`to_q`, `to_k`, `to_v`, `to_out.0` are adapted, `init_lora_weights="gaussian"` (B = 0, so training starts from the
base model), the base weights frozen (in half precision on a GPU), the adapter trained in fp32;
train_dreambooth_lora.py adapts the text encoder's `q_proj`, `k_proj`, `v_proj`, `out_proj`. Checkpoints of such a
model hold only the adapter (`sdnb.train.checkpoint.TRAINABLE_ONLY`).

A LoRA run's `final/` holds `pytorch_lora_weights.safetensors` (diffusers' format, with the LoRA configs in its
metadata so rank and alpha load back) and `sdnb_lora.json`, the base model it adapts (`sdnb.models` loads both).

The kohya file holds, per adapted layer, ``<name>.lora_down.weight`` (rank x in), ``<name>.lora_up.weight``
(out x rank) and ``<name>.alpha``; the UIs add ``alpha / rank * up @ down`` (times the user's strength) to the
layer's weight. ``<name>`` is the diffusers module path with dots as underscores, after ``lora_unet_`` for the UNet
and ``lora_te_text_model_`` for SD v1's text encoder: A1111 maps such names to its LDM modules
(extensions-builtin/Lora/networks.py, ``convert_diffusers_name_to_compvis``) and ComfyUI lists them among the keys
it accepts (comfy/lora.py, ``model_lora_keys_unet`` / ``model_lora_keys_clip``). The renaming itself is diffusers'
``convert_state_dict_to_kohya``; `lora_to_kohya` fixes what it leaves SD v1-unready (the text encoder's prefix, the
alpha).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from diffusers import ModelMixin, StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.state_dict_utils import StateDictType
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from sdnb.models import LORA_META
from sdnb.singlefile import save_atomic
from sdnb.train.checkpoint import TRAINABLE_ONLY

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # diffusers' train_dreambooth_lora.py
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file name `load_lora_weights` looks for in a folder
PARTS = ("unet.", "text_encoder.")


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0, targets: Sequence[str] = UNET_TARGETS) -> nn.Module:
    """Freeze `model` and add a LoRA adapter ("default", `rank`, scale alpha / rank; alpha 0 = rank) to its `targets`:
    only the adapter trains, and checkpoints hold only the adapter."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(targets))
    if isinstance(model, ModelMixin):
        model.add_adapter(config)  # diffusers' own (the UNet)
    else:  # transformers' add_adapter asks for a newer peft than diffusers does: peft's function directly
        inject_adapter_in_model(config, model)
    setattr(model, TRAINABLE_ONLY, True)
    return model


def has_lora(model: nn.Module) -> bool:
    """True for a model carrying the adapter `add_lora` adds."""
    return "default" in (getattr(model, "peft_config", None) or {})


def place(model: nn.Module, device: torch.device | str, frozen_dtype: torch.dtype) -> nn.Module:
    """A LoRA model on `device`: frozen base weights in `frozen_dtype`, the adapter in fp32 (diffusers' recipe)."""
    model.to(device) if next(model.parameters()).dtype == frozen_dtype else model.to(device, frozen_dtype)
    cast_training_params(model, dtype=torch.float32)
    return model


def count_parameters(models: Mapping[str, nn.Module]) -> dict[str, int]:
    """{"trainable", "total"}: parameters over `models` (what a checkpoint and the optimizer hold: "trainable")."""
    params = [p for m in models.values() for p in m.parameters()]
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def estimate_lora_parameters(model: nn.Module, rank: int, targets: Sequence[str] = UNET_TARGETS) -> int:
    """Parameters a rank-`rank` adapter on `targets` adds, before adding it: rank * (in + out) per matched Linear
    (peft matches a target by the module name's end)."""
    return sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


def save_lora(folder: str | Path, unet: nn.Module, text_encoder: nn.Module | None = None,
              base: Mapping[str, str] | None = None) -> Path:
    """Write the adapters in diffusers' format (with their configs as metadata) and `sdnb_lora.json` holding `base`
    (model_id, model_config, vae_path of the base model) into `folder`."""
    folder = Path(folder)
    te = text_encoder if text_encoder is not None and has_lora(text_encoder) else None
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te) if te is not None else None,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict() if te is not None else None)
    config = unet.peft_config["default"]
    meta = {**dict(base or {}), "rank": config.r, "alpha": config.lora_alpha, "text_encoder": te is not None}
    (folder / LORA_META).write_text(json.dumps(meta, indent=1))
    return folder


def _to_peft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT names (``lora_A`` / ``lora_B``) from PEFT or diffusers LoRA names; PEFT names pass unchanged."""
    state_dict = convert_unet_state_dict_to_peft(state_dict)  # ``.lora.down`` / ``.lora.up`` (UNet layers)
    if any("lora_linear_layer" in k for k in state_dict):  # text encoder layers in diffusers' format
        state_dict = convert_state_dict_to_peft(state_dict, original_type=StateDictType.DIFFUSERS)
    return state_dict


def lora_to_kohya(state_dict: dict[str, torch.Tensor],
                  alpha: float | dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """A PEFT / diffusers LoRA state dict of an SD v1 UNet (and text encoder) -> kohya names.

    Keys may start with ``unet.`` / ``text_encoder.`` as in diffusers' ``pytorch_lora_weights.safetensors``;
    keys without either are the UNet's. `alpha` is the LoRA's ``lora_alpha`` (the UIs scale by alpha / rank, as
    PEFT does), one number or one per part (``{"unet": 8, "text_encoder": 4}``); None writes the rank (scale 1).
    """
    prefixed = {k if k.startswith(PARTS) else "unet." + k: v for k, v in state_dict.items()}
    peft = _to_peft(prefixed)
    if not any(".lora_A." in k for k in peft):
        raise ValueError(f"no LoRA weights (lora_A / lora.down) among the keys, e.g. {list(state_dict)[:3]}")
    out = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        if key.startswith("lora_te1_"):  # diffusers names SDXL's first text encoder; SD v1's is lora_te_
            key = "lora_te_" + key[len("lora_te1_"):]
        if key.startswith("lora_te_") and not key.startswith("lora_te_text_model_"):
            key = "lora_te_text_model_" + key[len("lora_te_"):]  # transformers >= 5.6 drops "text_model."
        if key.endswith(".alpha"):
            part = "text_encoder" if key.startswith("lora_te_") else "unet"
            given = alpha.get(part) if isinstance(alpha, dict) else alpha
            value = torch.tensor(float(given if given is not None else value), dtype=torch.float32)
        out[key] = value
    return out


def export_lora(folder: str | Path, out_path: str | Path, dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> Path:
    """Write a LoRA run's adapter (its final/, or a folder `save_lora` wrote) as one kohya-style .safetensors file."""
    folder = Path(folder)
    meta = json.loads((folder / LORA_META).read_text())
    kohya = lora_to_kohya(load_file(str(folder / LORA_WEIGHTS)), alpha=float(meta["alpha"]))
    return save_atomic({k: v.to(dtype).contiguous() for k, v in kohya.items()}, out_path, overwrite)
