"""Free space before writing: refuse a checkpoint that cannot fit instead of leaving a torn one behind.

Sizes are shown in decimal gigabytes, GB = 10**9 bytes (as Colab's disk gauge and Google Drive's storage
page label them); `free_bytes` reads `shutil.disk_usage`, so on Google Drive's FUSE mount it is the
space the mount reports, which may lag behind Drive's own quota by a few seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

GB = 10 ** 9  # decimal gigabyte: the unit every message here is labelled with


class NotEnoughSpace(OSError):
    """A folder's file system has less free space than a write needs."""


def format_gb(n_bytes: float) -> str:
    """Bytes as decimal GB, with enough digits to tell small sizes apart ("0.019 GB", "4.27 GB", "512.3 GB")."""
    gb = n_bytes / GB
    return f"{gb:.3f} GB" if gb < 1 else f"{gb:.2f} GB" if gb < 100 else f"{gb:.1f} GB"


def existing_parent(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (a folder to be created is measured there)."""
    path = Path(os.path.abspath(path))
    return next(p for p in (path, *path.parents) if p.exists())


def free_bytes(path: str | Path) -> int:
    """Free bytes (for this user) on the file system that holds `path`, or will hold it once created."""
    return shutil.disk_usage(existing_parent(path)).free


def folder_size(path: str | Path) -> int:
    """Bytes of all files under a folder (0 if it does not exist; a file's own size for a file; links not followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile (a pruned checkpoint)
                pass
    return total


def ensure_space(path: str | Path, need_bytes: int, what: str) -> int:
    """Raise NotEnoughSpace unless `need_bytes` fit at `path` (what = what is about to be written, for the
    message); returns the free bytes."""
    free = free_bytes(path)
    if free < need_bytes:
        raise NotEnoughSpace(f"not enough space in {path}: need {format_gb(need_bytes)}, have {format_gb(free)} "
                             f"(for {what}); free space there, lower keep_checkpoints, or choose another folder")
    return free
