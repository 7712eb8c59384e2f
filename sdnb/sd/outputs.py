"""What an SD fine-tuning run leaves behind besides samples: fp16 weights (the best, and a weights-only mirror),
the Drive budget, the over-fitting flag and the training summary of metrics.json."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sdnb.lora import TEXT_TARGETS, UNET_TARGETS, estimate_lora_parameters, has_lora, save_lora
from sdnb.runtime import pick_device
from sdnb.sd.config import SDConfig
from sdnb.sd.model import SDParts
from sdnb.train.checkpoint import list_checkpoints, step_of
from sdnb.train.logs import read_log
from sdnb.train.parts import resolve_optimizer
from sdnb.train.sync import Mirror, copy_tree_atomic

GB = 1024 ** 3


# ---------------------------------------------------------------- weights
def save_unet_fp16(unet: nn.Module, folder: str | Path) -> Path:
    """The UNet as fp16 safetensors (`variant="fp16"`), written through a temporary folder.
    Load with `UNet2DConditionModel.from_pretrained(folder, variant="fp16")`."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unet.save_config(tmp)
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()},
              str(tmp / "diffusion_pytorch_model.fp16.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def halve_weights(folder: str | Path, keep_fp32: bool = False) -> None:
    """Store the floating-point weights of every safetensors file under `folder` in fp16, one tensor at a time:
    in place (the files keep their names and load as fp32 too: `from_pretrained` upcasts), or with `keep_fp32` as
    diffusers' fp16 variant beside them (`name.fp16.safetensors`, loaded with `variant="fp16"`)."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        if file.stem.endswith(".fp16"):
            continue
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
            half = {k: (t.half() if t.is_floating_point() else t) for k in f.keys() for t in [f.get_tensor(k)]}
        out = file.with_name(f"{file.stem}.fp16{file.suffix}") if keep_fp32 else file.with_name(f".tmp-{file.name}")
        save_file(half, str(out), metadata=metadata)
        if not keep_fp32:
            os.replace(out, file)


def save_weights(unet: nn.Module, text_encoder: nn.Module | None, folder: str | Path, base: dict) -> Path:
    """What the best weights and the weights-only mirror keep: a LoRA run's adapter (the folder then loads as a LoRA
    folder; `base` names its base model), else the fp16 UNet in folder/unet."""
    if not has_lora(unet):
        return save_unet_fp16(unet, Path(folder) / "unet")
    folder = Path(folder)
    tmp = folder / ".tmp-lora"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora(tmp, unet, text_encoder, base)
    for file in tmp.iterdir():
        os.replace(file, folder / file.name)
    tmp.rmdir()
    return folder


class WeightsMirror(Mirror):
    """The loop's mirror, copying fp16 UNet weights (run_dir/weights/step-N, the newest `keep`) instead of full states."""

    ITEMS = ("weights", "log", "final")

    def _sync_weights(self) -> None:
        local = sorted((self.run_dir / "weights").glob("step-*"), key=step_of)
        remote = self.sync_dir / "weights"
        remote.mkdir(exist_ok=True)
        for path in local[-self.keep:]:
            if not (remote / path.name).exists():
                copy_tree_atomic(path, remote / path.name)
        for old in sorted(remote.glob("step-*"), key=step_of)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- the Drive budget
@dataclass
class DriveBudget:
    """Sizes (GiB) of what a run mirrors to sync_dir, the free space there, and the choice of sync_what."""

    checkpoint_gb: float
    weights_gb: float
    final_gb: float
    keep: int
    free_gb: float | None
    sync_dir: str
    sync_what: str

    def fits(self, what: str) -> bool:
        need = (self.checkpoint_gb if what == "full" else self.weights_gb) * self.keep + self.final_gb
        return self.free_gb is None or need <= 0.95 * self.free_gb

    def __str__(self) -> str:
        lines = [f"one checkpoint (full training state): {self.checkpoint_gb:.2f} GiB; fp16 UNet weights: "
                 f"{self.weights_gb:.2f} GiB; final pipeline: {self.final_gb:.2f} GiB; keep_checkpoints = {self.keep}"]
        if not self.sync_dir:
            return "\n".join(lines + ["sync_dir = '': nothing is mirrored (checkpoints stay in run_dir)"])
        free = "unknown" if self.free_gb is None else f"{self.free_gb:.1f} GiB"
        lines.append(f"free at {self.sync_dir}: {free}; full needs {self.checkpoint_gb * self.keep + self.final_gb:.1f} "
                     f"GiB, weights-only {self.weights_gb * self.keep + self.final_gb:.1f} GiB -> mirroring: "
                     f"{self.sync_what}")
        if not self.fits(self.sync_what):
            lines.append(f"WARNING: sync_dir will run out of space with sync_what={self.sync_what!r}: lower "
                         "keep_checkpoints, choose sync_what='weights', or free space there")
        if self.sync_what == "weights":
            lines.append("weights-only: after a runtime reset, resume='latest' finds only local checkpoints; the "
                         "mirrored fp16 UNets load with UNet2DConditionModel.from_pretrained(path, variant='fp16')")
        return "\n".join(lines)


def _free_gb(path: str) -> float | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free / GB
    except OSError:
        return None


def drive_budget(cfg: SDConfig, parts: SDParts) -> DriveBudget:
    """Estimate what one checkpoint weighs (fp32 weights + optimizer state + EMA of the trained models) and
    decide `sync_what` ('auto': full states when `keep_checkpoints` of them fit at sync_dir, else weights)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    if cfg.lora_rank:  # only the adapters train, are checkpointed and make final/ (fp32)
        trained = estimate_lora_parameters(parts.unet, cfg.lora_rank, UNET_TARGETS) + (estimate_lora_parameters(
            parts.text_encoder, cfg.lora_rank, TEXT_TARGETS) if cfg.train_text_encoder else 0)
        weights, final = trained * 4, trained * 4
    else:
        trained = count(parts.unet) + (count(parts.text_encoder) if cfg.train_text_encoder else 0)
        final_bytes = {"fp32": 4, "fp16": 2, "both": 6}[cfg.final_weights]  # the final pipeline's files
        weights = count(parts.unet) * 2
        final = (count(parts.unet) + count(parts.text_encoder) + count(parts.vae)) * final_bytes
    optimizer = resolve_optimizer(cfg.optimizer, pick_device(cfg.device))
    per_param = 4 + (2 if optimizer == "adamw8bit" else 8) + (4 if cfg.ema else 0)
    budget = DriveBudget(trained * per_param / GB, weights / GB, final / GB, cfg.keep_checkpoints,
                         _free_gb(cfg.sync_dir) if cfg.sync_dir else None, cfg.sync_dir, cfg.sync_what)
    if cfg.sync_what == "auto":
        budget.sync_what = "full" if budget.fits("full") else "weights"
    return budget


# ---------------------------------------------------------------- over-fitting
@dataclass
class OverfitReport:
    """Whether the validation loss has stayed above its best for `patience` evaluations while the training loss fell."""

    overfitting: bool
    evaluations_since_best: int
    best_step: int | None
    best_val: float
    best_weights: Path | None
    best_checkpoint: Path | None
    message: str

    def __str__(self) -> str:
        return self.message


def _smoothed_at(rows: list[dict], step: float, smooth: float = 0.9) -> float:
    """The training loss smoothed as in the plot (EMA, bias-corrected) at `step`; the first one before any is logged."""
    avg = weight = 0.0
    for r in rows:
        if r["step"] > step:
            break
        avg, weight = smooth * avg + (1 - smooth) * r["loss"], smooth * weight + (1 - smooth)
    return avg / weight if weight else rows[0]["loss"] if rows else math.nan


def overfit_report(run_dir: str | Path, patience: int = 3, rows: list[dict] | None = None) -> OverfitReport:
    """Read run_dir/log.csv: over-fitting = the validation loss has stayed above its best for the last `patience`
    evaluations (it rose and did not come back) while the smoothed training loss fell, or since the evaluation before
    fine-tuning (step 0) whatever the training loss did. Names the best evaluation,
    its weights (run_dir/best) and the nearest full checkpoint."""
    run_dir = Path(run_dir)
    rows = read_log(run_dir / "log.csv") if rows is None else rows
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if not val:
        return OverfitReport(False, 0, None, math.nan, None, None, "no validation loss logged yet")
    best = min(range(len(val)), key=lambda i: (val[i][1], i))
    (best_step, best_val), since = val[best], len(val) - 1 - best
    train_then, train_now = _smoothed_at(train, best_step), _smoothed_at(train, val[-1][0])
    from_start = best == 0 and best_step == 0  # held-out images only got worse once fine-tuning began
    flag = since >= patience and (train_now < train_then or from_start)
    best_json = run_dir / "best" / "best.json"
    weights = run_dir / "best" if best_json.exists() and json.loads(best_json.read_text())["step"] == best_step else None
    kept = list_checkpoints(run_dir)
    nearest = min(kept, key=lambda p: (abs(step_of(p) - best_step), step_of(p))) if kept else None
    where = f"step {int(best_step)} (val_loss {best_val:.4g})" + (f", weights in {weights}" if weights else "") + \
            (f"; nearest full checkpoint: {nearest}" if nearest else "")
    if flag and from_start and not train_now < train_then:
        message = (f"OVER-FITTING: the validation loss has stayed above its value before fine-tuning for {since} "
                   f"evaluations (now {val[-1][1]:.4g} at step {int(val[-1][0])}): the training images pull the model "
                   f"away from the held-out ones from the start. Best so far: {where}")
    elif flag:
        message = (f"OVER-FITTING: the validation loss has stayed above its best for {since} evaluations (now "
                   f"{val[-1][1]:.4g} at step {int(val[-1][0])}) while the training loss fell ({train_then:.4g} -> "
                   f"{train_now:.4g}). Best so far: {where}")
    else:
        message = f"no over-fitting flagged ({since} of {patience} evaluations above the best). Best: {where}"
    return OverfitReport(flag, since, int(best_step), best_val, weights, nearest, message)


def training_summary(run_dir: str | Path, patience: int = 3) -> dict[str, Any]:
    """What a run's log says: steps, training loss (smoothed), validation loss at the start, the end and its best,
    and the over-fitting flag (the "training" section of 03's metrics.json)."""
    run_dir = Path(run_dir)
    rows = read_log(run_dir / "log.csv")
    report = overfit_report(run_dir, patience, rows)
    train = [r for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    metrics = {"step": int(rows[-1]["step"]) if rows else 0,
               "train_loss_smoothed": _smoothed_at(train, math.inf) if train else None,
               "val_loss_start": val[0] if val else None, "val_loss_end": val[-1] if val else None,
               "best_step": report.best_step, "best_val_loss": report.best_val if val else None,
               "best_weights": str(report.best_weights) if report.best_weights else None,
               "overfitting": report.overfitting, "evaluations_since_best": report.evaluations_since_best}
    return metrics
