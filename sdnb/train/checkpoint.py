"""Checkpoints that are complete or ignored: `run_dir/checkpoints/step-NNNNNN/`.

A checkpoint is `accelerator.save_state` (weights, optimizer, registered LR scheduler and EMA, every
process's RNG states) plus `sdnb_state.json` (step, data position, log window, config). It is written
into `.tmp-step-NNNNNN/`, the marker file `sdnb_complete` goes in last, then the folder is renamed.
Readers only trust folders named `step-NNNNNN` that hold the marker, so a process killed while
writing (or a half-copied folder on Google Drive) leaves the previous checkpoint in charge.

What a resume must reproduce besides the state accelerate saves (the data order and the RNG streams) is in
`sdnb.train.batches`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model

from sdnb.data.files import MARKER

STATE = "sdnb_state.json"
_NAME = re.compile(r"^step-(\d{6,})$")
_TEST_PAUSE_ENV = "SDNB_TEST_PAUSE_IN_CHECKPOINT"  # test hook: "<step>" sleeps inside that checkpoint's write
# A model with this attribute set to True is checkpointed by its trainable parameters only (a LoRA adapter over
# frozen weights that the run loads again from the base model): see `register_portable_weights`.
TRAINABLE_ONLY = "sdnb_checkpoint_trainable_only"


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at an optimizer step."""
    return f"step-{step:06d}"


def step_of(path: str | Path) -> int:
    """The step a checkpoint folder holds, from its name."""
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like step-000100)")
    return int(match.group(1))


def is_complete(path: str | Path) -> bool:
    """True for a folder named step-NNNNNN that holds the completion marker."""
    path = Path(path)
    return bool(_NAME.match(path.name)) and (path / MARKER).is_file()


def marker_id(path: str | Path) -> str:
    """The unique id written in a checkpoint's marker (tells two copies of one checkpoint apart from others)."""
    try:
        return (Path(path) / MARKER).read_text().strip()
    except OSError:
        return ""


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root/checkpoints`, oldest first ([] if the folder is missing or unreadable)."""
    folder = Path(root) / "checkpoints"
    try:
        found = [p for p in folder.iterdir() if is_complete(p)]
    except OSError:
        return []
    return sorted(found, key=step_of)


def find_latest(run_dir: str | Path, sync_dir: str | Path = "") -> Path | None:
    """The newest complete checkpoint in run_dir or sync_dir (run_dir wins a tie), or None."""
    candidates = list_checkpoints(run_dir) + (list_checkpoints(sync_dir) if sync_dir else [])
    return max(candidates, key=step_of, default=None)  # max keeps the first of equal steps: run_dir's


def read_state(path: str | Path) -> dict[str, Any]:
    """The `sdnb_state.json` of a checkpoint."""
    with open(Path(path) / STATE) as f:
        return json.load(f)


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint of the prepared objects and `state` (call on every process)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed process
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**state, "step": step, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "id": uuid.uuid4().hex}
        (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
        if os.environ.get(_TEST_PAUSE_ENV) == str(step):
            time.sleep(120)
        (tmp / MARKER).write_text(state["id"] + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore the prepared objects and RNG states from a complete checkpoint; returns its sdnb state."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={str(path)!r} is not a complete checkpoint folder "
                                f"(a step-NNNNNN folder holding '{MARKER}')")
    accelerator.load_state(str(path))
    return read_state(path)


def prune(root: str | Path, keep: int, protect: set[Path] | frozenset = frozenset()) -> None:
    """Delete all but the newest `keep` complete checkpoints under root/checkpoints, and stale temporaries."""
    folder = Path(root) / "checkpoints"
    for path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        if path not in protect:
            shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".tmp-step-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)


def set_aside_newer(root: str | Path, step: int) -> list[Path]:
    """Rename checkpoints newer than `step` to `abandoned-step-...` (resuming from an older checkpoint)."""
    moved = []
    for path in list_checkpoints(root):
        if step_of(path) > step:
            target = path.with_name(f"abandoned-{path.name}-{int(time.time())}")
            os.rename(path, target)
            moved.append(target)
    return moved


def has_run(root: str | Path) -> list[Path]:
    """What in `root` shows that a run already wrote there (log.csv, checkpoint folders)."""
    root = Path(root)
    found = [root / "log.csv"] if (root / "log.csv").exists() else []
    folder = root / "checkpoints"
    try:
        found += [p for p in folder.iterdir() if _NAME.match(p.name)]
    except OSError:
        pass
    return found


def _trainable_names(model: torch.nn.Module) -> set[str] | None:
    """The names of the trainable parameters of a model marked `TRAINABLE_ONLY`, else None (all weights)."""
    if not getattr(model, TRAINABLE_ONLY, False):
        return None
    return {name for name, p in model.named_parameters() if p.requires_grad}


def register_portable_weights(accelerator: Accelerator) -> None:
    """Save and load the prepared models' weights unwrapped, so a checkpoint resumes under any process count; a
    model marked `TRAINABLE_ONLY` saves and loads only its trainable parameters."""
    def save_hook(models: list, weights: list, output_dir: str) -> None:
        weights[:] = [accelerator.get_state_dict(m, unwrap=True) for m in models]
        for i, model in enumerate(models):
            keep = _trainable_names(accelerator.unwrap_model(model))
            if keep is not None:
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            inner, device = accelerator.unwrap_model(model), str(accelerator.device)
            keep = _trainable_names(inner)
            if keep is None:
                load_model(inner, str(file), device=device)
                continue
            state = load_file(str(file), device=device)
            if set(state) != keep:
                raise ValueError(f"{file} holds other trainable weights than this run's ({len(state)} vs {len(keep)}: "
                                 "was lora_rank or train_text_encoder changed?)")
            inner.load_state_dict(state, strict=False)
        models.clear()  # loaded here: accelerate skips them

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, lrs: list[float],
                          betas: tuple[float, float], weight_decay: float) -> None:
    """After a load, use this run's lr (one per param group), betas and weight decay: a second stage may
    change them, while the loaded optimizer and LR scheduler states hold the first stage's."""
    for i, (group, base) in enumerate(zip(optimizer.param_groups, lrs)):
        group.update(betas=betas, weight_decay=weight_decay)
        if group["initial_lr"] != base:
            group["initial_lr"] = scheduler.base_lrs[i] = base
            group["lr"] = base * scheduler.lr_lambdas[i](scheduler.last_epoch)


def write_final(run_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Write run_dir/final through `write(tmp_folder)`; an older final/ is replaced only once it is complete."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "final", run_dir / ".tmp-final", run_dir / ".old-final"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


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
