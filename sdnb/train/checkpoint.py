"""Checkpoints that are complete or ignored: `run_dir/checkpoints/step-NNNNNN/`.

A checkpoint is `accelerator.save_state` (weights, optimizer, registered LR scheduler and EMA, every
process's RNG states) plus `sdnb_state.json` (step, data position, log window, config). It is written
into `.tmp-step-NNNNNN/`, with `sdnb_manifest.json` (each file's size and checksum, `sdnb.train.manifest`);
the marker file `sdnb_complete` goes in last, then the folder is renamed.
Readers only trust folders named `step-NNNNNN` that hold the marker, so a process killed while
writing (or a half-copied folder on Google Drive) leaves the previous checkpoint in charge.

What a resume must reproduce besides the state accelerate saves (the data order and the RNG streams) is in
`sdnb.train.batches`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import SCALER_NAME
from safetensors.torch import load_file, load_model

from sdnb.data.disk import NotEnoughSpace, format_gb, free_bytes
from sdnb.data.files import MARKER
from sdnb.train.manifest import verify_manifest, write_manifest

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


def checkpoint_folders(root: str | Path) -> list[Path]:
    """Every folder named step-NNNNNN under `root/checkpoints`, complete or not, oldest first ([] when there is no
    such folder). A folder that exists but cannot be listed raises its OSError: "nothing found" it is not."""
    try:
        found = [p for p in (Path(root) / "checkpoints").iterdir() if _NAME.match(p.name)]
    except FileNotFoundError:
        return []
    return sorted(found, key=step_of)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root/checkpoints`, oldest first (for pruning and mirroring: a folder that cannot be
    read counts as none; `sdnb.train.resume` is strict instead)."""
    try:
        folders = checkpoint_folders(root)
    except OSError:
        return []
    found = []
    for path in folders:
        try:
            if is_complete(path):
                found.append(path)
        except OSError:  # an unreadable folder: not a checkpoint anyone can use
            pass
    return found


def checkpoint_problems(path: str | Path) -> list[str]:
    """Why a checkpoint folder cannot be resumed ([] when it is complete and its files match its manifest)."""
    path = Path(path)
    try:
        if not _NAME.match(path.name) or not path.is_dir():
            return ["not a checkpoint folder (expected a step-NNNNNN folder)"]
        if not (path / MARKER).is_file():
            return [f"no completion marker '{MARKER}' (its write or copy did not finish)"]
        return verify_manifest(path)
    except OSError as err:
        return [f"unreadable ({type(err).__name__}: {err})"]


def find_latest(run_dir: str | Path, sync_dir: str | Path = "") -> Path | None:
    """The newest complete checkpoint in run_dir or sync_dir (run_dir wins a tie), or None."""
    candidates = list_checkpoints(run_dir) + (list_checkpoints(sync_dir) if sync_dir else [])
    return max(candidates, key=step_of, default=None)  # max keeps the first of equal steps: run_dir's


def read_state(path: str | Path) -> dict[str, Any]:
    """The `sdnb_state.json` of a checkpoint."""
    with open(Path(path) / STATE) as f:
        return json.load(f)


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint of the prepared objects and `state` (call on every process): files, then the
    manifest of their sizes and checksums, then the marker, then the rename. A failed write leaves no partial folder."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed process
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _finish(tmp, final, {**state, "step": step})
    except BaseException as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint filling the disk
        if _out_of_space(err):
            raise NotEnoughSpace(f"not enough space in {root}: writing {final.name} failed ({err}); have "
                                 f"{format_gb(free_bytes(root))} free. The partial checkpoint was removed and the earlier "
                                 "ones are intact: free space there (or lower keep_checkpoints), then resume='latest'"
                                 ) from err
        raise
    accelerator.wait_for_everyone()
    return final


def _finish(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """The main process's part of a save: the state file, the manifest, the marker (last), then the rename."""
    state = {**state, "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"), "id": uuid.uuid4().hex}
    (tmp / STATE).write_text(json.dumps(state, indent=1, default=str))
    write_manifest(tmp)
    if os.environ.get(_TEST_PAUSE_ENV) == str(state["step"]):
        time.sleep(120)
    (tmp / MARKER).write_text(state["id"] + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _out_of_space(err: BaseException) -> bool:
    """A write failed for lack of space: ENOSPC, or torch's zip writer failing part-way ("unexpected pos")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and ("unexpected pos" in str(err) or "file write failed" in str(err))


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore the prepared objects and RNG states from a complete checkpoint; returns its sdnb state.
    A checkpoint saved without fp16's loss scaler (bf16 or fp32 training) resumes under fp16 with a fresh scaler."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"resume={str(path)!r} is not a complete checkpoint folder "
                                f"(a step-NNNNNN folder holding '{MARKER}')")
    scaler = accelerator.scaler
    if scaler is not None and not (path / SCALER_NAME).exists():
        print(f"{path.name} was saved without fp16's loss scaler (trained in bf16 or fp32): fp16 continues with a "
              f"fresh one (scale {scaler.get_scale():g}); the first steps may be skipped while it adjusts", flush=True)
        accelerator.scaler = None  # accelerate would look for scaler.pt
    try:
        accelerator.load_state(str(path))
    finally:
        accelerator.scaler = scaler
    return read_state(path)


def prune(root: str | Path, keep: int, protect: set[Path] | frozenset = frozenset()) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints under root/checkpoints, and stale temporaries; the newest
    checkpoint that verifies is kept even when it is older (a damaged copy is never the only one left). Returns
    what it deleted."""
    folder, done = Path(root) / "checkpoints", []
    complete = list_checkpoints(root)
    old, kept = (complete[:-keep], complete[-keep:]) if keep > 0 else ([], complete)
    if old and not any(not checkpoint_problems(p) for p in reversed(kept)):
        good = next((p for p in reversed(old) if not checkpoint_problems(p)), None)
        if good is not None:
            print(f"keeping {good}: the newer checkpoints in {folder} do not verify", flush=True)
            protect = set(protect) | {good}
    for path in old:
        if path not in protect:
            shutil.rmtree(path, ignore_errors=True)
            done.append(path)
    for path in folder.glob(".tmp-step-*") if folder.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
    return done


def set_aside(path: Path, why: str) -> Path:
    """Rename a checkpoint folder to `<why>-step-NNNNNN-<time>` (kept, never read again, never pruned)."""
    target = path.with_name(f"{why}-{path.name}-{int(time.time())}")
    os.rename(path, target)
    return target


def set_aside_newer(root: str | Path, step: int) -> list[Path]:
    """Rename checkpoint folders newer than `step` (complete or not) to `abandoned-step-...` (resuming from an older
    checkpoint starts a new timeline)."""
    return [set_aside(path, "abandoned") for path in checkpoint_folders(root) if step_of(path) > step]


def has_run(root: str | Path) -> list[Path]:
    """What in `root` shows that a run already wrote there (log.csv, checkpoint folders, final weights). An error
    while looking raises (an unreadable folder is not an empty one)."""
    root = Path(root)
    found = [root / name for name in ("log.csv", "final") if (root / name).exists()]
    return found + checkpoint_folders(root)


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


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any, lrs: list[float], settings: Any,
                          emas: Any = ()) -> None:
    """After a load, use this run's lr (one per param group), betas, weight decay and EMA decay: a second stage may
    change them, while the loaded optimizer, LR scheduler and EMA states hold the first stage's."""
    for i, (group, base) in enumerate(zip(optimizer.param_groups, lrs)):
        group.update(betas=tuple(settings.adam_betas), weight_decay=settings.weight_decay)
        if group["initial_lr"] != base:
            group["initial_lr"] = scheduler.base_lrs[i] = base
            group["lr"] = base * scheduler.lr_lambdas[i](scheduler.last_epoch)
    for ema in emas:
        ema.decay = settings.ema_decay
