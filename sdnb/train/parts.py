"""The loop's parts that know nothing of its order: the accelerator, the optimizer, EMA weights swapped in for
evaluation, the default way to save final weights, what `fit` returns, and the messages of its guards."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import save_model
from torch import nn

from sdnb.runtime import pick_device, pick_precision
from sdnb.train.batches import rng_untouched
from sdnb.train.config import TrainConfig
from sdnb.train.logs import prepare_tracker


@dataclass
class TrainResult:
    """What `fit` returns: the final step, the last logged losses, where the weights are, the log rows."""

    step: int
    losses: dict[str, float]
    final_dir: Path | None
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    """Raised after `nan_patience` optimizer steps in a row had a non-finite loss."""


def make_accelerator(s: TrainConfig) -> Accelerator:
    """The run's Accelerator (device, mixed precision, tracker), every process seeded by (seed, rank)."""
    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()  # a notebook may train again with another precision
    device = pick_device(s.device)  # cpu=True is also what lets accelerate run several CPU processes
    accelerator = Accelerator(gradient_accumulation_steps=s.grad_accum, cpu=device.type == "cpu",
                              mixed_precision=pick_precision(device, s.mixed_precision),
                              log_with=prepare_tracker(s.log_with), project_dir=s.run_dir)
    set_seed(s.seed, device_specific=True)
    return accelerator


INSTALL_8BIT = 'pip install "sdnb[colab]" (it brings bitsandbytes), then restart the runtime'


def choose_optimizer(optimizer: str, device: torch.device) -> tuple[str, str]:
    """The optimizer `optimizer` names ('auto' = bitsandbytes' 8-bit AdamW on a CUDA GPU when it is installed, else
    AdamW) and, for 'auto', a sentence saying what it picked and why ('' otherwise)."""
    if optimizer != "auto":
        return optimizer, ""
    if device.type != "cuda":
        return "adamw", "optimizer='auto' -> AdamW: 8-bit AdamW (bitsandbytes) needs a CUDA GPU"
    try:
        import bitsandbytes  # noqa: F401 - optional, CUDA only
    except ImportError:
        return "adamw", ("optimizer='auto' -> AdamW, since bitsandbytes is not installed: its 8-bit AdamW keeps the "
                         "optimizer state in 2 bytes per trained parameter instead of 8 (SD 1.5's UNet: 1.6 GiB instead"
                         f" of 6.4 GiB, what a 16 GB T4 needs for a full fine-tune); for it: {INSTALL_8BIT}")
    return "adamw8bit", "optimizer='auto' -> 8-bit AdamW (bitsandbytes): 2 bytes of optimizer state per parameter"


def resolve_optimizer(optimizer: str, device: torch.device) -> str:
    """'auto' = bitsandbytes' 8-bit AdamW on a CUDA GPU when it is installed, else AdamW (`choose_optimizer`)."""
    return choose_optimizer(optimizer, device)[0]


def make_optimizer(s: TrainConfig, groups: list[dict], device: torch.device, show: bool = False) -> torch.optim.Optimizer:
    """AdamW, RAdam (torch.optim) or bitsandbytes' 8-bit AdamW ('auto': see `choose_optimizer`; `show` prints what
    it picked and why), over param groups."""
    kwargs = dict(lr=s.lr, betas=tuple(s.adam_betas), weight_decay=s.weight_decay)
    name, why = choose_optimizer(s.optimizer, device)
    if why and show:
        print(why, flush=True)
    if name == "adamw8bit":
        try:
            import bitsandbytes  # optional: only this optimizer needs it
        except ImportError as err:
            raise ImportError(f"optimizer='adamw8bit' needs bitsandbytes: {INSTALL_8BIT}; or set "
                              "optimizer='adamw'") from err
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    return {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}[name](groups, **kwargs)


def param_groups(models: Mapping[str, nn.Module], lrs: Mapping[str, float], lr: float) -> list[dict]:
    """One optimizer param group per model (its trainable parameters, its lr); a model with none is an error."""
    groups = []
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {name!r} has no parameter with requires_grad=True: nothing to train")
        groups.append({"params": params, "lr": lrs.get(name, lr)})
    return groups


def make_emas(models: Mapping[str, nn.Module], decay: float, device: torch.device) -> dict[str, EMAModel]:
    """diffusers' `EMAModel` of each model's trainable parameters, on the training device."""
    emas = {}
    for name, model in models.items():
        emas[name] = EMAModel([p for p in model.parameters() if p.requires_grad], decay=decay)
        emas[name].to(device)
    return emas


@contextmanager
def ema_weights(emas: Mapping[str, EMAModel], params: Mapping[str, list[torch.Tensor]]):
    """Swap the EMA weights into the models for the duration (no-op without EMA)."""
    for name, ema in emas.items():
        ema.store(params[name])
        ema.copy_to(params[name])
    try:
        yield
    finally:
        for name, ema in emas.items():
            ema.restore(params[name])


@contextmanager
def evaluation_mode(models: Mapping[str, nn.Module], emas: Mapping[str, EMAModel],
                    ema_params: Mapping[str, list[torch.Tensor]], device: torch.device, autocast: Any):
    """Evaluation or sampling inside training: EMA weights swapped in, eval mode, no gradients, the run's autocast,
    and the training RNG streams left as they were (so a resume reproduces); training mode restored after."""
    modes = {name: m.training for name, m in models.items()}
    with rng_untouched(device), torch.no_grad(), autocast, ema_weights(emas, ema_params):
        for m in models.values():
            m.eval()
        try:
            yield
        finally:
            for name, m in models.items():
                m.train(modes[name])


def save_pretrained_all(models: Mapping[str, nn.Module], path: Path) -> None:
    """Default `save_final`: `save_pretrained` of each model into path/<name> (safetensors otherwise)."""
    for name, model in models.items():
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(path / name)
        else:
            (path / name).mkdir(parents=True, exist_ok=True)
            save_model(model, str(path / name / "model.safetensors"))


def nonfinite_message(step: int, streak: int, patience: int, lr: float, where: Any) -> str:
    """Why training stopped after `patience` non-finite losses in a row, and what to do."""
    return (f"training stopped at step {step}: the loss was not finite (NaN or inf) for {streak} steps in a row "
            f"(nan_patience={patience}). Usual causes: the SD VAE overflows in fp16 (use mixed_precision='no' for "
            f"fp32, or 'bf16' on a GPU that has it: Ampere or newer, not a T4); a learning rate too high "
            f"(lr={lr:g}); broken input data. Those steps were skipped; the last good checkpoint is kept: "
            f"{where or 'none saved yet'}")


def check_grads_synced(accelerator: Accelerator, params: list[torch.Tensor]) -> bool:
    """True when every process holds the same gradients after backward; raises, saying what the step function does
    wrong, when they differ (a model called through a method such as vae.encode() escapes DDP's gradient sync)."""
    total = sum(p.grad.double().sum() for p in params if p.grad is not None)
    every = accelerator.gather(torch.as_tensor(total, device=accelerator.device).reshape(1)).tolist()
    if max(every) - min(every) > 1e-6 * max(1.0, *map(abs, every)):
        raise RuntimeError("the gradients differ between processes after backward: step_fn must call the models it "
                           "is given through forward (models[name](...)); DistributedDataParallel synchronises "
                           "gradients only there, so calls like vae.encode() bypass it")
    return True


@contextmanager
def deferred_interrupt(on_interrupt: Callable[[], None]):
    """A first Ctrl-C only calls `on_interrupt` (the loop then finishes its step, saves an 'interrupted'
    checkpoint and stops); a second one raises KeyboardInterrupt at once. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous, seen = signal.getsignal(signal.SIGINT), []

    def handler(signum: int, frame: Any) -> None:
        if seen:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        seen.append(signum)
        on_interrupt()
        print("\ninterrupt: finishing this step, then saving a checkpoint (interrupt again to stop at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process only and share its result, or its exception, with every process (so a refusal on
    the main process stops all of them instead of leaving the others waiting at a barrier)."""
    box: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            box[0] = fn()
        except Exception as err:  # raised below, on every process
            box[1] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    if box[1] is not None:
        raise box[1]
    return box[0]
