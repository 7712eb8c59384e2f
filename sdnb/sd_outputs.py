"""What an SD fine-tuning run leaves behind besides samples: the best weights, the over-fitting flag,
metrics.json, the Drive budget, a weights-only mirror, and the final pipeline.

`Callbacks` holds the loop's `evaluate`, `sample` and `save_final` for `sdnb.sd.finetune`.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdnb.checkpoint import checkpoint_name, list_checkpoints, step_of
from sdnb.logs import read_log
from sdnb.sd_samples import make_pipeline, render_samples
from sdnb.sync import Mirror, copy_tree_atomic

GB = 1024 ** 3


# ---------------------------------------------------------------- weights
def save_unet_fp16(unet: nn.Module, folder: str | Path) -> Path:
    """The UNet as fp16 safetensors (`variant="fp16"`), written through a temporary folder.
    Load with `UNet2DConditionModel.from_pretrained(folder, variant="fp16")`."""
    from safetensors.torch import save_file

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
    """Sizes of what a run mirrors to sync_dir, the free space there, and the choice of sync_what."""

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
        lines = [f"one checkpoint (full training state): {self.checkpoint_gb:.2f} GB; fp16 UNet weights: "
                 f"{self.weights_gb:.2f} GB; final pipeline: {self.final_gb:.2f} GB; keep_checkpoints = {self.keep}"]
        if not self.sync_dir:
            return "\n".join(lines + ["sync_dir = '': nothing is mirrored (checkpoints stay in run_dir)"])
        free = "unknown" if self.free_gb is None else f"{self.free_gb:.1f} GB"
        lines.append(f"free at {self.sync_dir}: {free}; full needs {self.checkpoint_gb * self.keep + self.final_gb:.1f} GB, "
                     f"weights-only {self.weights_gb * self.keep + self.final_gb:.1f} GB -> mirroring: {self.sync_what}")
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


def drive_budget(cfg, parts) -> DriveBudget:
    """Estimate what one checkpoint weighs (fp32 weights + optimizer state + EMA of the trained models) and
    decide `sync_what` ('auto': full states when `keep_checkpoints` of them fit at sync_dir, else weights)."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    trained = count(parts.unet) + (count(parts.text_encoder) if cfg.train_text_encoder else 0)
    optimizer = cfg.optimizer
    if optimizer == "auto":
        from sdnb.runtime import pick_device
        from sdnb.sd import resolve_optimizer
        optimizer = resolve_optimizer("auto", pick_device(cfg.device))
    per_param = 4 + (2 if optimizer == "adamw8bit" else 8) + (4 if cfg.ema else 0)
    total = count(parts.unet) + count(parts.text_encoder) + count(parts.vae)
    budget = DriveBudget(trained * per_param / GB, count(parts.unet) * 2 / GB, total * 4 / GB, cfg.keep_checkpoints,
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
    evaluations (it rose and did not come back) while the smoothed training loss fell. Names the best evaluation,
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
    flag = since >= patience and train_now < train_then
    best_json = run_dir / "best" / "best.json"
    weights = run_dir / "best" if best_json.exists() and json.loads(best_json.read_text())["step"] == best_step else None
    kept = list_checkpoints(run_dir)
    nearest = min(kept, key=lambda p: (abs(step_of(p) - best_step), step_of(p))) if kept else None
    where = f"step {int(best_step)} (val_loss {best_val:.4g})" + (f", weights in {weights}" if weights else "") + \
            (f"; nearest full checkpoint: {nearest}" if nearest else "")
    if flag:
        message = (f"OVER-FITTING: the validation loss has stayed above its best for {since} evaluations (now "
                   f"{val[-1][1]:.4g} at step {int(val[-1][0])}) while the training loss fell ({train_then:.4g} -> "
                   f"{train_now:.4g}). Best so far: {where}")
    else:
        message = f"no over-fitting flagged ({since} of {patience} evaluations above the best). Best: {where}"
    return OverfitReport(flag, since, int(best_step), best_val, weights, nearest, message)


def write_metrics(run_dir: str | Path, patience: int = 3) -> dict[str, Any]:
    """run_dir/metrics.json: steps, training loss (smoothed), validation loss at the start, the end and its best,
    and the over-fitting flag; returns the dict."""
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
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def plot_validation(run_dir: str | Path, smooth: float = 0.9):
    """The loss plot of log.csv (training raw and smoothed | validation) with the best validation step marked."""
    from sdnb.logs import plot_losses

    fig = plot_losses(Path(run_dir) / "log.csv", smooth=smooth)
    report = overfit_report(run_dir)
    if report.best_step is not None and len(fig.axes) > 1:
        fig.axes[1].axvline(report.best_step, color="k", ls="--", lw=0.8, label=f"best: step {report.best_step}")
        fig.axes[1].legend()
    return fig


# ---------------------------------------------------------------- the loop's callbacks
class Callbacks:
    """`evaluate`, `sample` and `save_final` for Trainer.fit, on the main process with unwrapped (EMA) models."""

    def __init__(self, cfg, parts, validation, unwrap, weights_sync_dir: str = ""):
        """`weights_sync_dir`: mirror fp16 UNet weights there at every checkpoint (main process only)."""
        self.cfg, self.parts, self.validation, self.unwrap = cfg, parts, validation, unwrap
        self.run_dir = Path(cfg.run_dir)
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
            save_unet_fp16(unet, self.run_dir / "best" / "unet")
            best_json.write_text(json.dumps({"step": step, "val_loss": loss}))
        rows = read_log(self.run_dir / "log.csv") + [{"step": step, "val_loss": loss}]
        report = overfit_report(self.run_dir, self.cfg.overfit_patience, rows)
        if report.overfitting and not self.warned:
            print(f"\n{report}", flush=True)
            self.warned = True
        return {"loss": loss}

    def sample(self, models: dict[str, nn.Module], step: int, path: Path) -> None:
        """Sample grid at this step (samples/step-N.png); with weights-only sync, the fp16 UNet to weights/step-N."""
        unet, text_encoder = self._models(models)
        self._render(unet, text_encoder, step)
        if self.mirror:
            save_unet_fp16(unet, self.run_dir / "weights" / checkpoint_name(step) / "unet")
            for old in sorted((self.run_dir / "weights").glob("step-*"), key=step_of)[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            self.mirror.request("weights", "log")

    def _render(self, unet: nn.Module, text_encoder: nn.Module | None, step: int) -> None:
        cfg = self.cfg
        if not cfg.sample_prompts:
            return
        render_samples(make_pipeline(self.parts, unet, text_encoder), cfg.sample_prompts, cfg.sample_cfg_scales,
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
        """The whole pipeline (fine-tuned UNet, the text encoder and VAE used) in fp32 safetensors."""
        unet, text_encoder = self._models(models)
        te = text_encoder or self.parts.text_encoder
        dtypes = {m: m.dtype for m in (self.parts.vae, te) if m.dtype != torch.float32}  # half on a GPU
        for m in dtypes:
            m.to(torch.float32)
        try:
            make_pipeline(self.parts, unet, te).save_pretrained(path, safe_serialization=True)
        finally:
            for m, dtype in dtypes.items():
                m.to(dtype)

    def close(self) -> None:
        """Mirror the final pipeline and the log (weights-only sync), waiting for the copies."""
        if self.mirror:
            if (self.run_dir / "final").is_dir():
                self.mirror.request("final", "log")
            self.mirror.close()
