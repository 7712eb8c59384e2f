"""A checkpoint's list of files, sizes and checksums (`sdnb_manifest.json`), and the check of a folder against it.

The completion marker says a writer finished; the manifest says what it finished writing, so a copy that
later lost bytes (a half-synced Google Drive folder, a truncated file, a file deleted by hand) is found
before a resume trusts it. Write it last before the marker: `write_manifest(tmp)`, then the marker.

Checksums: sha256 of the whole file up to `FULL_HASH_MAX` (64 MiB: ~50 ms at the ~1.3 GB/s sha256 of one
CPU core); bigger files (weights, optimizer states of GBs, where reading all back from Drive would cost
minutes) get a *partial* sha256 of their size, first and last MiB, which still catches truncation,
a zero-filled tail or a wrong file, but not a change in the middle; the manifest says which.

Folders written before manifests existed are checked by what each file type allows cheaply: every
safetensors file must parse its header (`safetensors.safe_open`), torch.save files (zip archives) must
keep their end record, and a checkpoint must hold its weights, optimizer and random states, non-empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from sdnb.data.files import MARKER

MANIFEST = "sdnb_manifest.json"
FULL_HASH_MAX = 64 * 2 ** 20
EDGE = 2 ** 20  # bytes hashed at each end of a big file
# A checkpoint written by accelerate.save_state (+ sdnb): the kinds of file it must hold (glob, name in messages).
CHECKPOINT_FILES = (("model*.safetensors", "model.safetensors"), ("optimizer*.bin", "optimizer.bin"),
                    ("random_states_*.pkl", "random_states_0.pkl"))


def _listing(folder: Path) -> list[Path]:
    """Files under `folder` (recursive), relative, sorted; the manifest and the marker left out."""
    found = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in found if p.as_posix() not in (MANIFEST, MARKER))


def file_digest(path: Path, size: int) -> tuple[str, str]:
    """(kind, hex digest): ("sha256", whole file) up to FULL_HASH_MAX, else ("partial-sha256", size + ends)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX:
            while chunk := f.read(2 ** 20):
                h.update(chunk)
            return "sha256", h.hexdigest()
        h.update(str(size).encode() + b"\n" + f.read(EDGE))
        f.seek(size - EDGE)
        h.update(f.read(EDGE))
    return "partial-sha256", h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Write `folder/sdnb_manifest.json` (every file's relative path, size and checksum); returns its path."""
    folder = Path(folder)
    files = {}
    for rel in _listing(folder):
        size = (folder / rel).stat().st_size
        kind, digest = file_digest(folder / rel, size)
        files[rel.as_posix()] = {"size": size, kind: digest}
    doc = {"format": 1, "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
           "note": f"sha256 of whole files up to {FULL_HASH_MAX} bytes; partial-sha256 = sha256 of the size, "
                   f"first and last {EDGE} bytes", "files": files}
    out, tmp = folder / MANIFEST, folder / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def _check_entry(folder: Path, rel: str, entry: dict[str, Any]) -> str | None:
    path = folder / rel
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel}: missing"
    if size != entry["size"]:
        return f"{rel}: {size} bytes, expected {entry['size']}"
    kind = "sha256" if "sha256" in entry else "partial-sha256"
    if kind in entry and file_digest(path, size) != (kind, entry[kind]):
        edge = f"{EDGE // 2 ** 20} MiB" if EDGE % 2 ** 20 == 0 else f"{EDGE} bytes"
        where = "" if kind == "sha256" else f" (in its first or last {edge})"
        return f"{rel}: contents differ from the manifest{where}"
    return None


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems of `folder` against its manifest ("optimizer.bin: missing"); [] when it is intact.
    A folder without a manifest is checked by file type (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    if not (folder / MANIFEST).exists():
        return verify_without_manifest(folder)
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST}: unreadable ({type(err).__name__}: {err})"]
    problems = []
    for rel, entry in files.items():
        try:
            problem = _check_entry(folder, rel, entry)
        except OSError as err:  # unreadable: a dropped Drive connection, permissions
            problem = f"{rel}: unreadable ({err})"
        if problem:
            problems.append(problem)
    return problems


def _check_by_type(path: Path, rel: str) -> str | None:
    size = path.stat().st_size
    if size == 0:
        return f"{rel}: 0 bytes"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "np"):  # header only; "np" needs no torch
                pass
        except SafetensorError as err:  # "incomplete metadata, file not fully covered", ...
            return f"{rel}: not a readable safetensors file ({err})"
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"  # torch.save's format since torch 1.6
    if zipped and not zipfile.is_zipfile(path):
        return f"{rel}: truncated (its zip end record is missing)"
    if path.name == "sdnb_state.json":
        try:
            json.loads(path.read_text())
        except ValueError as err:
            return f"{rel}: not valid JSON ({err})"
    return None


def verify_without_manifest(folder: str | Path) -> list[str]:
    """Cheap checks of a folder written before manifests: every file non-empty and parseable by type, and,
    for a checkpoint (it holds sdnb_state.json), its weights, optimizer and random states present."""
    folder = Path(folder)
    problems = []
    for rel in _listing(folder):
        try:
            problem = _check_by_type(folder / rel, rel.as_posix())
        except OSError as err:
            problem = f"{rel.as_posix()}: unreadable ({err})"
        if problem:
            problems.append(problem)
    if (folder / "sdnb_state.json").exists():
        problems += [f"{name}: missing" for pattern, name in CHECKPOINT_FILES if not any(folder.glob(pattern))]
    return problems
