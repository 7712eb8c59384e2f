"""`TrainConfig`: what the one training loop reads. The stage configs (`VAEConfig`, `SDConfig`) extend it, so a
notebook's validated config is what `Trainer` takes; one set of names, defaults and checks.

Learning rates are accepted up to MAX_LR = 1e-2: fine-tuning SD uses 1e-6 (EveryDream2) to 1e-4 (the VAE recipes,
diffusers' train_text_to_image), LoRA up to ~1e-3; lr=1 took the tiny VAE's loss from 0.2 to 45,217.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdnb.config import BaseConfig, ConfigError, param
from sdnb.data.folders import overlap

MAX_LR = 1e-2
PENDING = "config.pending.json"  # written while config.json holds an earlier run's config (sdnb.train.resume)

OPTIMIZERS = ("auto", "adamw", "radam", "adamw8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass
class TrainConfig(BaseConfig):
    """The training loop's parameters, shared by 02 and 03 (and by `Trainer` in the tests and benchmarks)."""

    max_steps: int = param(1000, ge=0, help="optimizer steps in total, counting from the run's start; 0 = epochs only")
    max_epochs: int = param(0, ge=0, help="0 = budget in steps only; else stop at whichever comes first")
    batch_size: int = param(4, ge=1, help="micro-batch per process")
    grad_accum: int = param(1, ge=1, help="micro-batches per optimizer step")
    optimizer: str = param("adamw", choices=OPTIMIZERS,
                           help="auto = 8-bit AdamW on a CUDA GPU with bitsandbytes, else AdamW")
    lr: float = param(1e-4, gt=0, le=MAX_LR, help="learning rate (per-model overrides: fit(lrs=...))")
    weight_decay: float = param(0.0, ge=0)
    adam_betas: list = param([0.9, 0.999])
    lr_scheduler: str = param("constant", choices=LR_SCHEDULERS, help="a diffusers get_scheduler name")
    warmup_steps: int = param(0, ge=0)
    max_grad_norm: float = param(1.0, ge=0, help="gradient clipping; 0 = none")
    ema: bool = param(False, help="keep an EMA of the weights (evaluated, sampled and saved)")
    ema_decay: float = param(0.9999, gt=0, le=1)
    log_every: int = param(10, ge=1, help="steps between log.csv rows")
    validate_every: int = param(0, ge=0, help="steps between evaluations; 0 = at the end only")
    sample_every: int = param(0, ge=0, help="steps between samples; 0 = at checkpoints and the end only")
    checkpoint_every: int = param(500, ge=0, help="0 = off")
    checkpoint_minutes: float = param(30.0, ge=0, help="also checkpoint every M minutes; 0 = off")
    keep_checkpoints: int = param(2, ge=1, help="newest K checkpoints kept locally and at sync_dir")
    resume: str = param("", help="'' = new run, 'latest', or a checkpoint folder")
    nan_patience: int = param(5, ge=1, help="non-finite losses in a row before stopping")
    num_workers: int = param(0, ge=0, help="DataLoader worker processes")
    log_with: str = param("", choices=("", "tensorboard", "wandb"), help="W&B runs offline unless a key is set")

    def validate(self) -> None:
        super().validate()
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas={self.adam_betas!r} is not accepted: expected two numbers in [0, 1)")
        if self.max_steps == 0 and self.max_epochs == 0:
            raise ConfigError("max_steps=0 and max_epochs=0: set at least one training budget")
        if self.sync_dir and overlap(self.run_dir, self.sync_dir):
            raise ConfigError(f"sync_dir={self.sync_dir!r} is not accepted: it is, contains or lies inside run_dir="
                              f"{self.run_dir!r}; the mirror must be another folder (on Colab, one under "
                              "/content/drive/MyDrive)")
        if self.resume not in ("", "latest") and not Path(self.resume).is_dir():
            raise ConfigError(f"resume={self.resume!r} is not accepted: expected '' (a new run), 'latest' (the newest "
                              f"checkpoint in run_dir or sync_dir) or a checkpoint folder such as "
                              f"{Path(self.run_dir) / 'checkpoints' / 'step-000500'}; no folder {self.resume!r} exists")

    def save(self) -> Path:
        """Write run_dir/config.json; while it holds an earlier run's different config, write config.pending.json
        instead: the Trainer makes it config.json once the run is accepted (a refused resume changes nothing)."""
        current = self.path / "config.json"
        try:
            earlier = json.loads(current.read_text())
        except FileNotFoundError:
            return super().save()
        except ValueError:  # torn: still the earlier run's, not to be replaced before the run is accepted
            earlier = None
        if earlier == json.loads(json.dumps(self.to_dict())):
            return current
        pending = self.path / PENDING
        pending.write_text(json.dumps(self.to_dict(), indent=2))
        print(f"{current} holds the earlier run's config; this one is in {pending} until training accepts it "
              "(resume='latest' with allowed changes)", flush=True)
        return pending
