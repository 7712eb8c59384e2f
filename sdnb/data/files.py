"""Copying files and folders so that a reader never sees half of one: through a temporary name, then a rename.
What the Drive mirror and the notebooks' `sync_dir` copies are made of."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from sdnb.data.folders import check_sync_dir

MARKER = "sdnb_complete"  # a checkpoint's completion marker (sdnb.train.checkpoint): copied last


def _copy_file(src: Path, dst: Path) -> None:
    """Copy one file's bytes (the single place the mirror writes data; tests make it fail)."""
    shutil.copyfile(src, dst)


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy a file to `dst` through a temporary name, then rename it into place."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    try:
        _copy_file(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_tree_atomic(src: Path, dst: Path, last: tuple[str, ...] = (MARKER,)) -> None:
    """Copy a folder to `dst` through a temporary folder (files named in `last`, e.g. a checkpoint's completion
    marker, copied last), then swap it into place: an older copy is replaced only once the new one is complete."""
    tmp = dst.with_name(f".tmp-{dst.name}-{uuid.uuid4().hex[:8]}")
    try:
        files = sorted((p for p in src.rglob("*") if p.is_file()), key=lambda p: (p.name in last, str(p)))
        tmp.mkdir(parents=True)
        for path in files:
            target = tmp / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(path, target)
        if dst.exists():  # replace an older copy only once the new one is complete
            old = dst.with_name(f".old-{dst.name}-{uuid.uuid4().hex[:8]}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def mirror_outputs(run_dir: str | Path, sync_dir: str | Path, names: Iterable[str]) -> list[Path]:
    """Copy what a notebook wrote (files or folders under run_dir named in `names`, those that exist) to sync_dir,
    each atomically; returns the copies. For the notebooks whose results are not checkpoints (01, 04)."""
    run_dir, sync_dir = Path(run_dir), check_sync_dir(sync_dir)  # never on the local disk of an unmounted Drive
    copied = []
    for name in names:
        src = run_dir / name
        if src.is_dir():
            copy_tree_atomic(src, sync_dir / name)
        elif src.is_file():
            copy_file_atomic(src, sync_dir / name)
        else:
            continue
        copied.append(sync_dir / name)
    return copied
