"""Fine-tuning SD's UNet through the shared loop: the loop's callbacks (stable validation loss with the best
weights kept, sample grids at checkpoints, the final pipeline) and the run; and what `python -m sdnb.train
config.json` runs for a 03 config."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from sdnb.data.captions import read_captions
from sdnb.data.images import split_by_image
from sdnb.lora import count_parameters, has_lora, save_lora
from sdnb.models import LORA_META, RUN_META, is_hub_id
from sdnb.runtime import weights_dtype
from sdnb.sd.buckets import BucketDataset
from sdnb.sd.config import SDConfig
from sdnb.sd.data import ImageLatents, build_datasets
from sdnb.sd.memory import memory_plan
from sdnb.sd.model import SDParts, StableValidation, load_parts, make_step_fn, trainable_models
from sdnb.sd.outputs import WeightsMirror, drive_budget, halve_weights, overfit_report, save_weights, training_summary
from sdnb.sd.plot import plot_validation
from sdnb.sd.samples import render_samples, sample_sheet
from sdnb.stats import write_metrics
from sdnb.train import Trainer, TrainResult
from sdnb.train.checkpoint import checkpoint_name, list_checkpoints, step_of
from sdnb.train.logs import read_log
from sdnb.train.trackers import log_images
from sdnb.viz import save


def base_model(cfg: SDConfig) -> dict[str, str]:
    """How a LoRA run's adapter names its base model (sdnb_lora.json): model_id, model_config and vae_path, local
    paths made absolute so that 04 finds them from anywhere."""
    def where(ref: str) -> str:
        return ref if not ref or is_hub_id(ref) or "://" in ref else str(Path(ref).resolve())

    return {"model_id": where(cfg.model_id), "model_config": where(cfg.model_config), "vae_path": where(cfg.vae_path)}


def write_run_meta(final_dir: Path, cfg: SDConfig) -> None:
    """The run folder and training data (absolute paths) that 04 measures this model against, wherever final/ is
    later copied: in final/sdnb_run.json, or for a LoRA run added to the adapter's sdnb_lora.json."""
    meta_file = Path(final_dir) / (LORA_META if (Path(final_dir) / LORA_META).is_file() else RUN_META)
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"stage": "sd"}
    meta.update(run_dir=str(Path(cfg.run_dir).resolve()), data_dir=str(Path(cfg.data_dir).resolve()))
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")


class Callbacks:
    """`evaluate`, `sample` and `save_final` for Trainer.fit, on the main process with unwrapped (EMA) models."""

    def __init__(self, cfg: SDConfig, parts: SDParts, validation: StableValidation | None, unwrap: Callable,
                 weights_sync_dir: str = "", accelerator: Any = None):
        """`weights_sync_dir`: mirror fp16 UNet weights (a LoRA: the adapter) there at every checkpoint (main process
        only); `accelerator`: the run's, whose trackers (log_with) get the sample grids."""
        self.cfg, self.parts, self.validation, self.unwrap = cfg, parts, validation, unwrap
        self.run_dir, self.accelerator = Path(cfg.run_dir), accelerator
        self.base = base_model(cfg)
        self.warned = False
        self.mirror = WeightsMirror(self.run_dir, weights_sync_dir, keep=cfg.keep_checkpoints) if weights_sync_dir else None

    def _models(self, models: dict[str, nn.Module]) -> tuple[nn.Module, nn.Module | None]:
        return self.unwrap(models["unet"]), self.unwrap(models["text_encoder"]) if "text_encoder" in models else None

    def evaluate(self, models: dict[str, nn.Module], step: int) -> dict[str, float]:
        """The stable validation loss; new bests are saved to run_dir/best; warns once when over-fitting starts."""
        unet, text_encoder = self._models(models)
        loss = self.validation(unet, text_encoder)
        best_json = self.run_dir / "best" / "best.json"
        best = json.loads(best_json.read_text())["val_loss"] if best_json.exists() else math.inf
        if self.cfg.save_best and loss < best:
            save_weights(unet, text_encoder, self.run_dir / "best", self.base)
            best_json.write_text(json.dumps({"step": step, "val_loss": loss}))
        rows = read_log(self.run_dir / "log.csv") + [{"step": step, "val_loss": loss}]
        report = overfit_report(self.run_dir, self.cfg.overfit_patience, rows)
        if report.overfitting and not self.warned:
            print(f"\n{report}", flush=True)
            self.warned = True
        return {"loss": loss}

    def sample(self, models: dict[str, nn.Module], step: int, path: Path) -> None:
        """Sample grid at this step (samples/step-N.png, also to the trackers); with weights-only sync, the fp16 UNet
        (or the LoRA adapter) to weights/step-N."""
        unet, text_encoder = self._models(models)
        grid = self._render(unet, text_encoder, step)
        if grid is not None and self.accelerator is not None:
            log_images(self.accelerator, {"samples": Image.open(grid)}, step)
        if self.mirror:
            save_weights(unet, text_encoder, self.run_dir / "weights" / checkpoint_name(step), self.base)
            for old in sorted((self.run_dir / "weights").glob("step-*"), key=step_of)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.mirror.request("weights", "log")

    def _render(self, unet: nn.Module, text_encoder: nn.Module | None, step: int) -> Path | None:
        cfg = self.cfg
        if not cfg.sample_prompts:
            return None
        return render_samples(self.parts.pipeline(unet, text_encoder), cfg.sample_prompts, cfg.sample_cfg_scales,
                       self.run_dir / "samples" / checkpoint_name(step), cfg.seed, cfg.sample_steps, cfg.resolution,
                       cfg.negative_prompt, title=f"step {step}")

    def base_samples(self, autocast: Any = None) -> None:
        """Samples of the base model (step 0), once per run folder, leaving every RNG as it was; `autocast`: the
        accelerator's mixed-precision context (frozen models may be in half precision)."""
        if (self.run_dir / "samples" / checkpoint_name(0)).is_dir() or list_checkpoints(self.run_dir):
            return
        device = self.parts.unet.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []), torch.no_grad(), \
                autocast or contextlib.nullcontext():
            training = self.parts.unet.training
            self.parts.unet.eval()
            self._render(self.parts.unet, None, 0)
            self.parts.unet.train(training)

    def save_final(self, models: dict[str, nn.Module], path: Path) -> None:
        """The whole pipeline (fine-tuned UNet, the text encoder and VAE used) in safetensors, in the precision
        `final_weights` names (fp16, fp32, or both: fp16 as diffusers' "fp16" variant beside fp32); for a LoRA run
        the adapter in diffusers' format and the base model it adapts (`sdnb.lora.save_lora`)."""
        unet, text_encoder = self._models(models)
        if has_lora(unet):
            save_lora(path, unet, text_encoder, self.base)
            write_run_meta(path, self.cfg)
            return
        te = text_encoder or self.parts.text_encoder
        dtypes = {m: m.dtype for m in (self.parts.vae, te) if m.dtype != torch.float32}  # half on a GPU
        for m in dtypes:
            m.to(torch.float32)
        try:
            self.parts.pipeline(unet, te).save_pretrained(path, safe_serialization=True)
            if self.cfg.final_weights != "fp32":  # half the size on Drive; from_pretrained still loads it as fp32
                halve_weights(path, keep_fp32=self.cfg.final_weights == "both")
        finally:
            for m, dtype in dtypes.items():
                m.to(dtype)
        write_run_meta(path, self.cfg)

    def close(self) -> None:
        """Mirror the final pipeline and the log (weights-only sync), waiting for the copies."""
        if self.mirror:
            if (self.run_dir / "final").is_dir():
                self.mirror.request("final", "log")
            self.mirror.close()


def report_trainable(cfg: SDConfig, models: dict[str, nn.Module], show: bool = True) -> dict[str, int]:
    """Print (when `show`) and return how many parameters train (the optimizer and the checkpoints hold only these)."""
    n = count_parameters(models)
    if show:
        what = f"LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha or cfg.lora_rank:g})" if cfg.lora_rank else "full fine-tune"
        print(f"{what} of {' and '.join(models)}: {n['trainable']:,} trainable parameters of {n['total']:,} "
              f"({100 * n['trainable'] / max(n['total'], 1):.2f}%)", flush=True)
        if cfg.lora_rank and cfg.lr < 1e-5:
            print(f"note: lr={cfg.lr:g} suits a full fine-tune; LoRA usually trains at 1e-4 (diffusers' "
                  "train_text_to_image_lora.py)", flush=True)
    return n


def finetune(cfg: SDConfig, parts: SDParts, train_ds: BucketDataset, batches: Callable[[int], list[list[int]]],
             val_ds: BucketDataset) -> TrainResult:
    """Fine-tune `parts` on the datasets `build_datasets` made, through the shared loop; returns its `TrainResult`.

    Validation loss every `validate_every` steps (logged as val_loss; the best weights kept in run_dir/best),
    sample grids at every checkpoint (run_dir/samples), the pipeline in run_dir/final.
    """
    sync_what = cfg.sync_what if cfg.sync_dir else "full"
    if sync_what == "auto":
        sync_what = drive_budget(cfg, parts).sync_what
    # with weights-only sync the loop mirrors nothing; the callbacks mirror fp16 UNet weights
    trainer = Trainer(replace(cfg, sync_dir="") if sync_what == "weights" else cfg, config=cfg.to_dict())
    device = trainer.device
    if trainer.is_main:  # before anything moves to the device, whose free memory the plan reads
        print(memory_plan(cfg, parts, device=device), flush=True)
    models = trainable_models(parts, cfg.train_text_encoder, cfg.gradient_checkpointing, cfg.lora_rank, cfg.lora_alpha)
    parts.to(device, weights_dtype(trainer.accelerator.mixed_precision, device))
    report_trainable(cfg, models, trainer.is_main)
    if cfg.cache_latents:
        train_ds = ImageLatents(train_ds, parts, device, embeddings=not cfg.train_text_encoder)
    callbacks = Callbacks(cfg, parts, StableValidation(parts, val_ds, cfg.seed) if len(val_ds) else None,
                          trainer.accelerator.unwrap_model,
                          weights_sync_dir=cfg.sync_dir if sync_what == "weights" and trainer.is_main else "",
                          accelerator=trainer.accelerator)
    if trainer.is_main:
        callbacks.base_samples(trainer.accelerator.autocast())
    try:
        return trainer.fit(models, make_step_fn(parts, cfg.snr_gamma, cfg.noise_offset), train_ds,
                           batch_sampler_fn=batches, lrs={"text_encoder": cfg.text_encoder_lr},
                           evaluate=callbacks.evaluate if len(val_ds) else None, sample=callbacks.sample,
                           save_final=callbacks.save_final)
    finally:
        callbacks.close()


def train_from_config(config: dict) -> TrainResult:
    """`python -m sdnb.train run_dir/config.json` for stage 'sd': what 03_sd_finetune does, without display."""
    cfg = SDConfig.from_dict(config)
    train, val = split_by_image(read_captions(cfg.data_dir, progress=False), cfg.val_fraction, cfg.seed)
    print(f"{len(train)} training images, {len(val)} validation images", flush=True)
    parts = load_parts(cfg.model_id, cfg.vae_path, cfg.model_config)
    print(drive_budget(cfg, parts), flush=True)
    result = finetune(cfg, parts, *build_datasets(cfg, train, val))
    save(plot_validation(cfg.path, patience=cfg.overfit_patience), cfg.path / "grids" / "loss.png", close=True)
    sheet = sample_sheet(cfg.path / "samples")
    if sheet is not None:
        sheet.save(cfg.path / "grids" / "samples_by_checkpoint.png")
    write_metrics(cfg.path / "metrics.json", training=training_summary(cfg.path, cfg.overfit_patience))
    print(overfit_report(cfg.path, cfg.overfit_patience), flush=True)
    return result
