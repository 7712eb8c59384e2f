"""The guards around the loop's writes: before a checkpoint (still this run's folders, room on the disk, finite
weights) and after a run (locks released, the optimizer, gradients and the Accelerator's references dropped)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from sdnb.data.disk import ensure_space
from sdnb.train.checkpoint import checkpoint_name, prune
from sdnb.train.parts import NonFiniteLossError, on_main
from sdnb.train.space import MARGIN, checkpoint_need, make_room


def nonfinite_weights(models: Mapping[str, nn.Module]) -> list[str]:
    """Names of the parameters holding NaN or inf (none may be saved as a checkpoint)."""
    return [f"{name}.{key}" for name, model in models.items() for key, p in model.named_parameters()
            if not torch.isfinite(p.detach()).all()]


def before_save(accelerator: Accelerator, run_dir: Path, step: int, models: Mapping[str, nn.Module], locks: list,
                mirror: Any, estimate: Callable[[], int], last_good: Path | None) -> None:
    """Before a checkpoint (every process): refuse non-finite weights; then, on the main process, raise LockLost if
    another process took this run's folders, remove partial temporaries and make room for the checkpoint (the size
    of the last one, else `estimate()` bytes), deleting the oldest early when that is the only way, never the
    newest that verifies; else NotEnoughSpace. A refusal stops every process."""
    bad = nonfinite_weights(models)
    if bad:  # NaN weights are never saved as "the last good checkpoint"
        raise NonFiniteLossError(f"not saving a checkpoint at step {step}: the weights hold NaN or inf "
                                 f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). The last good checkpoint "
                                 f"is {last_good or 'none (none saved yet)'}: resume from it with a lower lr, or, if "
                                 "this ran in fp16, mixed_precision='no' (fp32) or 'bf16' on a GPU that has it (Ampere "
                                 "or newer)")

    def room() -> None:
        for lock in locks:
            lock.check()
        with mirror.lock if mirror else nullcontext():
            for partial in (run_dir / "checkpoints").glob(".tmp-step-*"):
                shutil.rmtree(partial, ignore_errors=True)
            need = checkpoint_need(run_dir, estimate())
            make_room(run_dir, need, f"checkpoint {checkpoint_name(step)}", mirror.busy() if mirror else ())

    on_main(accelerator, room)


def after_save(run_dir: Path, step: int, keep: int, mirror: Any) -> None:
    """Main process, after a checkpoint: prune the local ones (never one being mirrored, never the newest that
    verifies) and ask the mirror for a copy."""
    with mirror.lock if mirror else nullcontext():
        prune(run_dir, keep, mirror.busy() if mirror else set())
    if mirror:
        mirror.checkpoint_saved(step)


def write_final(run_dir: str | Path, write: Callable[[Path], None], size: int = 0) -> Path:
    """Write run_dir/final through `write(tmp_folder)` if `size` bytes fit (else NotEnoughSpace); an older final/ is
    replaced only once the new one is complete, and a write that fails leaves no partial folder."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "final", run_dir / ".tmp-final", run_dir / ".old-final"
    for path in (tmp, old):
        shutil.rmtree(path, ignore_errors=True)
    ensure_space(run_dir, int(MARGIN * size), "the final weights")
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the checkpoints hold the same weights: resume='latest' writes it
        raise
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def close_run(accelerator: Accelerator, mirror: Any, locks: list, end_trackers: bool) -> None:
    """After `fit`, however it ended: wait for the mirror, end the trackers, release the locks, free the memory."""
    try:
        if mirror:
            mirror.close()
        if end_trackers:
            accelerator.end_training()
    finally:
        for lock in locks:
            lock.release()
        release_accelerator(accelerator)


def release_accelerator(accelerator: Accelerator) -> None:
    """Drop what the Accelerator holds of a finished run (prepared models and optimizer, registered objects, the
    checkpoint hooks whose closures refer back to it), so the optimizer state and gradients are freed at once,
    without waiting for the garbage collector."""
    for optimizer in accelerator._optimizers:
        for name in ("_optimizer_original_step_method", "_optimizer_patched_step_method"):  # fp16: a cycle
            optimizer.__dict__.pop(name, None)
        optimizer.optimizer.__dict__.pop("step", None)
        optimizer.optimizer.zero_grad(set_to_none=True)
    for held in (accelerator._optimizers, accelerator._models, accelerator._schedulers, accelerator._dataloaders,
                 accelerator._custom_objects, accelerator._save_model_state_pre_hook,
                 accelerator._load_model_state_pre_hook):
        held.clear()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
