"""Room for the next checkpoint, in run_dir before a save and in sync_dir before a copy.

The next checkpoint is about as large as the last one (before the first: the weights, optimizer state and EMA
copies in memory). When the free space is short, the oldest checkpoints are deleted early, never the newest one that
verifies; when even that is not enough, `NotEnoughSpace` says "not enough space in X: need N GB, have M GB" and
nothing is written (the earlier checkpoints stay as they are).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from sdnb.data.disk import ensure_space, folder_size, free_bytes
from sdnb.train.checkpoint import checkpoint_problems, list_checkpoints

MARGIN = 1.05  # a checkpoint may grow a little (optimizer states appear, a longer state file); 5% is ample


def state_bytes(models: Iterable[nn.Module], optimizer: torch.optim.Optimizer | None = None, emas: Iterable = ()) -> int:
    """Bytes a checkpoint of these will take: the weights, the optimizer's state tensors, the EMA copies."""
    tensors = [t for m in models for t in m.state_dict().values()]
    states = optimizer.state.values() if optimizer is not None else []
    tensors += [t for state in states for t in state.values() if torch.is_tensor(t)]
    tensors += [p for ema in emas for p in ema.shadow_params]
    return sum(t.numel() * t.element_size() for t in tensors)


def checkpoint_need(root: str | Path, estimate: int) -> int:
    """Bytes to have free before writing a checkpoint under root: the newest checkpoint's size (else `estimate`)."""
    newest = list_checkpoints(root)[-1:]
    return int(MARGIN * (folder_size(newest[0]) if newest else estimate))


def make_room(root: str | Path, need: int, what: str, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete the oldest checkpoints under root while fewer than `need` bytes are free, never the newest one that
    verifies (nor `protect`); then raise NotEnoughSpace if it still does not fit. Returns what was deleted."""
    root, removed = Path(root), []
    if free_bytes(root) >= need:
        return removed
    found = list_checkpoints(root)
    keep = next((p for p in reversed(found) if not checkpoint_problems(p)), None)
    for path in found:
        if free_bytes(root) >= need:
            break
        if path == keep or path in set(protect):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        print(f"not enough space in {root} for {what}: deleted the oldest checkpoint {path.name} early (keeping "
              f"{keep.name if keep else 'no verified checkpoint'})", flush=True)
    ensure_space(root, need, what)
    return removed
