"""``python -m sdnb.export RUN_DIR [OUT.safetensors] [--fp32 | --fp16] [--vae] [--merged] [--overwrite]``: one file
for AUTOMATIC1111 / ComfyUI.

RUN_DIR is an sdnb run folder (its ``final/`` holds the result) or a diffusers folder. What is written:
- a pipeline (03_sd_finetune) -> one SD v1 checkpoint (A1111 ``models/Stable-diffusion``, ComfyUI
  ``models/checkpoints``), fp16 unless --fp32, as SD 1.5's pruned fp16 release;
- a VAE (02_vae_finetune, or --vae for a pipeline's) -> a standalone VAE file (A1111 ``models/VAE``, ComfyUI
  ``models/vae``), fp32 unless --fp16, as vae-ft-mse-840000-ema-pruned;
- a LoRA run of 03 -> a kohya-style LoRA (A1111 ``models/Lora``, ComfyUI ``models/loras``), fp32 unless --fp16;
  --merged writes the base model with the LoRA fused into it as one checkpoint instead.
OUT defaults to RUN_DIR/export/<run name>[.vae|-lora].safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdnb.lora import export_lora
from sdnb.models import load_pipeline, lora_dir, pipeline_dir, vae_dir
from sdnb.singlefile import export_pipeline, export_vae, pipeline_to_ldm, save_atomic

WHERE = {"pipeline": "AUTOMATIC1111: models/Stable-diffusion/; ComfyUI: models/checkpoints/ (Load Checkpoint)",
         "merged": "AUTOMATIC1111: models/Stable-diffusion/; ComfyUI: models/checkpoints/ (Load Checkpoint)",
         "vae": "AUTOMATIC1111: models/VAE/ (Settings > Stable Diffusion > SD VAE); ComfyUI: models/vae/ (Load VAE)",
         "lora": "AUTOMATIC1111: models/Lora/ (prompt <lora:NAME:1>); ComfyUI: models/loras/ (LoraLoader)"}
SUFFIX = {"pipeline": "", "merged": "-merged", "vae": ".vae", "lora": "-lora"}


def detect(path: str | Path, vae_only: bool = False) -> tuple[str, Path]:
    """("lora" | "pipeline" | "vae", the folder) for a run folder or a diffusers folder; a LoRA run or a pipeline wins
    unless `vae_only`."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such folder; give the run folder of 02_vae_finetune / 03_sd_finetune or a "
                                "diffusers folder")
    if not vae_only:
        lora = lora_dir(path)
        if lora is not None:
            return "lora", lora
        try:
            return "pipeline", Path(pipeline_dir(str(path), "run_dir"))
        except FileNotFoundError:
            pass
    try:
        return "vae", vae_dir(path, parameter="run_dir")
    except FileNotFoundError:
        pass
    raise FileNotFoundError(f"{path}: neither a LoRA run, a Stable Diffusion pipeline (model_index.json) nor a VAE "
                            "(config.json of an AutoencoderKL) in final/ or the folder; give the run folder of "
                            "02_vae_finetune / 03_sd_finetune or a diffusers folder")


def export(run_dir: str | Path, out: str | Path = "", *, vae_only: bool = False, merged: bool = False,
           dtype: torch.dtype | None = None, overwrite: bool = False) -> tuple[str, Path]:
    """Write the run's result as one .safetensors file (see the module docstring); returns (what, the file)."""
    kind, folder = detect(run_dir, vae_only)
    if merged and kind == "lora":
        kind = "merged"
    dtype = dtype or (torch.float16 if kind in ("pipeline", "merged") else torch.float32)
    out = Path(out) if out else Path(run_dir) / "export" / f"{Path(run_dir).resolve().name}{SUFFIX[kind]}.safetensors"
    if kind == "lora":
        return kind, export_lora(folder, out, dtype, overwrite)
    if kind == "vae":
        return kind, export_vae(folder, out, dtype, overwrite)
    if kind == "pipeline":
        return kind, export_pipeline(folder, out, dtype, overwrite)
    pipe = load_pipeline(str(folder), parameter="run_dir")  # the base model with the adapter
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    return kind, save_atomic(pipeline_to_ldm(pipe, dtype), out, overwrite)


def describe(kind: str, out: Path) -> str:
    """What was written, its size, and where each UI wants it."""
    return f"{kind} -> {out} ({out.stat().st_size / 2**20:.1f} MiB); copy it to {WHERE[kind]}"


def main(argv: list[str] | None = None) -> Path:
    """Parse the command line, export, print what was written and where it goes; returns the output path."""
    parser = argparse.ArgumentParser(prog="python -m sdnb.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="sdnb run folder (with final/) or diffusers pipeline / VAE folder")
    parser.add_argument("out", nargs="?", default="", help="output file ending in .safetensors (default: RUN_DIR/export/)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp32", action="store_true", help="float32 weights (default for a VAE and a LoRA)")
    precision.add_argument("--fp16", action="store_true", help="float16 weights (default for a pipeline)")
    parser.add_argument("--vae", action="store_true", help="export only the VAE (of a pipeline or run folder)")
    parser.add_argument("--merged", action="store_true", help="a LoRA run: the base model with the LoRA fused in")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.fp16 else torch.float32 if args.fp32 else None
    kind, out = export(args.run_dir, args.out, vae_only=args.vae, merged=args.merged, dtype=dtype,
                       overwrite=args.overwrite)
    print(describe(kind, out))
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # a message, not a traceback
        raise SystemExit(f"error: {err}") from None
