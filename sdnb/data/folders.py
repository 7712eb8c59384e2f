"""Create run_dir and sync_dir safely: never a folder where a file is, never a Drive folder on the local disk.

On Colab, Google Drive is a FUSE file system mounted at the folder given to `drive.mount` (usually
`/content/drive`), with `MyDrive` (or `My Drive`, `Shareddrives`) inside it (googlecolab/colabtools,
google/colab/drive.py: `mount_point_path:{mountpoint}`). Once Drive is unmounted, or after a runtime
reset, `/content/drive` is an empty local folder, and `mkdir -p /content/drive/MyDrive/sdnb` would quietly
put the "mirror" on the runtime's disk, which vanishes with it. So:

- a path on Google Drive (below `/content/drive`, or with a `MyDrive`/`My Drive`/`Shareddrives` component)
  is created only while that Drive's top folder (e.g. `/content/drive/MyDrive`) exists, and, for
  `/content/drive`, while it is a mount point (`os.path.ismount`; note that `MyDrive` itself is not one);
- run_dir (the local working folder) is created with its parents;
- sync_dir (a mirror on another disk) is created with its parents only inside a checked Drive mount;
  elsewhere its parent must exist, because a missing parent there nearly always means an unmounted disk
  or a typo, and creating it would write the "safe copy" somewhere that is not safe.
"""

from __future__ import annotations

import os
from pathlib import Path

DRIVE_ROOTS: tuple[str, ...] = ("/content/drive",)  # Colab's usual mount points (the notebooks mount here)
DRIVE_TOP_FOLDERS: tuple[str, ...] = ("MyDrive", "My Drive", "Shareddrives")  # what a Drive mount holds


class FolderError(ValueError):
    """A run_dir or sync_dir that cannot be used (a file, an unmounted Drive, a vanished parent)."""


def drive_mount_of(path: str | Path) -> tuple[Path, Path] | None:
    """(mount point, top folder) of a path on Google Drive, or None for a path elsewhere."""
    path = Path(os.path.abspath(path))
    parts = path.parts
    for i, part in enumerate(parts[1:], start=1):
        if part in DRIVE_TOP_FOLDERS:
            return Path(*parts[:i]), Path(*parts[:i + 1])
    for root in map(Path, DRIVE_ROOTS):
        if path == root or root in path.parents:
            top = Path(*parts[:len(root.parts) + 1]) if len(parts) > len(root.parts) else root
            return root, top
    return None


def _check_drive(path: Path, what: str) -> bool:
    """Raise FolderError if `path` is on a Drive that is not mounted; True when it is on a mounted Drive."""
    found = drive_mount_of(path)
    if found is None:
        return False
    mount, top = found
    if str(mount) in DRIVE_ROOTS and not os.path.ismount(mount):
        why = f"{mount} is not a mount point"
    elif not top.is_dir():
        why = f"{top} is missing"
    else:
        return True
    raise FolderError(f"{what}={str(path)!r} is on Google Drive, but Drive is not mounted at {mount} ({why}: "
                      f"after an unmount or a runtime reset it is an empty local folder): mount it first with "
                      f"`from google.colab import drive; drive.mount({str(mount)!r})`; refusing to create {what} "
                      "on the local disk, where it would vanish with the runtime")


def prepare_folder(path: str | Path, what: str = "run_dir", parents: bool | None = None) -> Path:
    """Create `path` (a folder) if needed and return it; raise FolderError with what to do when it cannot be.

    parents=None means: run_dir-like folders get their parents created, a sync_dir does not (except
    inside a mounted Google Drive), see the module docstring.
    """
    path = Path(path)
    try:
        return _prepare(path, what, what != "sync_dir" if parents is None else parents)
    except FileExistsError as err:  # a component is a file (or one appeared meanwhile)
        raise FolderError(f"{what}={str(path)!r} cannot be created: {err.filename} is a file") from err
    except OSError as err:  # e.g. Drive's "Transport endpoint is not connected"
        raise FolderError(f"{what}={str(path)!r} cannot be used: {err} (on Google Drive: remount it with "
                          "drive.mount(..., force_remount=True))") from err


def _prepare(path: Path, what: str, parents: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise FolderError(f"{what}={str(path)!r} is a file, not a folder: choose another {what} "
                          "or move that file away")
    on_drive = _check_drive(path, what)
    if path.is_dir():
        return path
    ancestor = next(p for p in path.parents if p.exists())  # "/" always exists
    if not ancestor.is_dir():
        raise FolderError(f"{what}={str(path)!r} cannot be created: {ancestor} is a file, not a folder")
    if not (parents or on_drive) and ancestor != path.parent:
        raise FolderError(f"{what}={str(path)!r}: its parent folder {path.parent} does not exist (was a disk "
                          f"unmounted?); {what} is created only inside an existing folder so that its copies "
                          f"never land on a disk that is not the one meant: create {path.parent} first")
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_sync_dir(sync_dir: str | Path) -> Path:
    """Create sync_dir if its parent exists (or it is inside a mounted Google Drive) and return it."""
    return prepare_folder(sync_dir, "sync_dir", parents=False)


def check_run_dir(run_dir: str | Path) -> Path:
    """Create run_dir with its parents (refused on an unmounted Google Drive) and return it."""
    return prepare_folder(run_dir, "run_dir", parents=True)


def overlap(a: str | Path, b: str | Path) -> bool:
    """Whether two folders are the same, or one lies inside the other (symbolic links resolved)."""
    a, b = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return a == b or a in b.parents or b in a.parents
