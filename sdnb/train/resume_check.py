"""What a resumed run (a second stage) may change in its config, and the refusal of everything else.

A checkpoint continues one training trajectory: its weights, optimizer state and data position only mean
something with the same model, data, batch, loss and optimizer. A second stage may change what the loop
reads afresh at every step or already re-applies on load (`sdnb.train.checkpoint.apply_hyperparameters` sets
lr, betas and weight decay; the EMA decay is set again): the budget, learning rates and their schedule,
cadences, mirroring, evaluation and sampling, and the hardware it runs on. Every field of VAEConfig and
SDConfig is in exactly one of ALLOWED, IGNORED, REFUSED (tests/train/test_resume_check.py checks it), so a new
field must be classified before it ships. `compare_configs` refuses any field it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sdnb.config import ConfigError

# Not compared: they name where this run is and how it was started, not what it trains.
IGNORED = frozenset({
    "run_dir",  # a run copied to another folder (or back from Drive) is the same run
    "resume",   # '' on the first stage, 'latest' or a path later: differs by design
})

ALLOWED = frozenset({
    # budget, learning rates and their schedule (re-applied on load)
    "max_steps", "max_epochs", "lr", "text_encoder_lr", "lr_scheduler", "warmup_steps",
    "weight_decay", "adam_betas", "max_grad_norm", "ema_decay", "nan_patience",
    # cadences
    "log_every", "validate_every", "sample_every", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
    # mirroring, runtime and hardware (fp32 master weights: the precision of autocast only)
    "sync_dir", "sync_what", "num_workers", "device", "mixed_precision", "log_with", "gradient_checkpointing",
    # evaluation and sampling (they do not feed the training step)
    "sample_prompts", "negative_prompt", "sample_cfg_scales", "sample_steps", "overfit_patience", "save_best",
    "n_val_patches", "tile_size", "fid_features", "n_bootstrap",
    # what is done with the result (export, Hub) and where the base model's config is read from
    "export_single_file", "hub_repo_id", "hub_private", "model_config", "final_weights",
    # 02's control run is its own run (run_dir/control): the fine-tuned run does not read it (a control run refuses
    # a change, see REFUSED_IN)
    "control_image_dir",
})

REFUSED = frozenset({
    "stage", "seed",  # the seed drives the data order and every process's RNG stream
    # the data and its split
    "image_dir", "val_image_dir", "val_fraction", "data_dir", "patch_size", "patches_per_epoch", "resolution",
    "cache_latents", "min_foreground", "foreground_threshold", "is_control",
    # augmentation
    "hflip", "vflip", "rot90", "flip", "crop_jitter", "caption_dropout",
    # the model and what is trained
    "model_id", "model_subfolder", "vae_path", "recipe", "trainable", "train_text_encoder", "ema",
    "lora_rank", "lora_alpha",
    # the batch (the saved data position counts micro-batches) and the optimizer state's kind
    "batch_size", "grad_accum", "optimizer",
    # the loss
    "mse_weight", "l1_weight", "lpips_weight", "lpips_net", "kl_weight", "snr_gamma", "noise_offset",
})

# Allowed fields that a run refuses to change when the flag named here is true in its config: what a control run of 02
# (is_control=True) trains on.
REFUSED_IN = {"control_image_dir": "is_control"}

ABSENT = "<absent>"  # a field one config does not have (saved by an older sdnb, or of another stage)


def _plain(value: Any) -> Any:
    """A value as JSON gives it back (tuple -> list), so a saved config compares equal to a fresh one."""
    return json.loads(json.dumps(value, default=str))


@dataclass
class ConfigChanges:
    """How a new config differs from the saved one: refused and allowed changes, each (field, old, new)."""

    refused: list[tuple[str, Any, Any]] = field(default_factory=list)
    allowed: list[tuple[str, Any, Any]] = field(default_factory=list)
    unknown: list[tuple[str, Any, Any]] = field(default_factory=list)  # a field only one config has

    @property
    def ok(self) -> bool:
        """True when nothing is refused."""
        return not self.refused

    def message(self, where: str = "the checkpoint") -> str:
        """Why a resume is refused: each refused field with both values, and what to do ('' if none)."""
        if not self.refused:
            return ""
        lines = [f"  {name}: {old!r} in {where}, now {new!r}" for name, old, new in self.refused]
        return (f"{where} was trained with other settings, which a resumed run cannot change:\n" + "\n".join(lines)
                + "\nstart a new run_dir, or set these back to the saved values")

    def summary(self) -> str:
        """One line of the changes a resume applies (allowed ones, and fields the saved config lacks)."""
        parts = [f"{name} {old!r} -> {new!r}" for name, old, new in self.allowed]
        parts += [f"{name} = {new!r} (not in the saved config)" if old == ABSENT else
                  f"{name} (saved as {old!r}, no longer a setting)" for name, old, new in self.unknown]
        return "changed for this stage: " + ", ".join(parts) if parts else "no config change"

    def raise_if_refused(self, where: str = "the checkpoint") -> None:
        """Raise ConfigChangeError with `message` if any change is refused."""
        if self.refused:
            raise ConfigChangeError(self.message(where))


class ConfigChangeError(ConfigError):
    """A resumed run changes a setting its checkpoint depends on."""


def compare_configs(saved: dict[str, Any], new: dict[str, Any], allowed: set[str] | frozenset = ALLOWED,
                    ignored: set[str] | frozenset = IGNORED) -> ConfigChanges:
    """Classify each differing field of two config dicts (`cfg.to_dict()`, a checkpoint's config).

    A field only one of them has (added to or removed from sdnb since the checkpoint) goes to `.unknown`,
    not refused: the user could not set it back. Any other difference outside `allowed` and `ignored` is
    refused."""
    changes = ConfigChanges()
    for name in sorted(set(saved) | set(new)):
        if name in ignored:
            continue
        old, now = _plain(saved.get(name, ABSENT)), _plain(new.get(name, ABSENT))
        if old == now:
            continue
        if name in allowed and not new.get(REFUSED_IN.get(name, ""), False):
            changes.allowed.append((name, old, now))
        elif name not in saved or name not in new:
            changes.unknown.append((name, old, now))
        else:
            changes.refused.append((name, old, now))
    return changes
