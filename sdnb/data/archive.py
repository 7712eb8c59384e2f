"""Safe, resumable extraction of .zip, .tar(.gz/.bz2/.xz) and .rar archives.

Every member is checked before anything is written: absolute paths, ``..`` components and
links (symbolic or hard) that point outside the destination are refused with an error naming
the member. Extraction goes into a temporary folder next to ``dest`` that is renamed to
``dest`` only when complete, with a marker file inside, so an interrupted extraction is redone
from scratch and a finished one is never repeated.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

from sdnb.data.disk import ensure_space, folder_size, format_gb

__all__ = ["MARKER", "UnsafeArchiveError", "extract"]

MARKER = ".sdnb-extracted.json"
MAX_RATIO, MIN_LIMIT = 100, 10 ** 9


class UnsafeArchiveError(ValueError):
    """An archive member would be written, or would point, outside the destination folder."""


def _normalise(name: str) -> str:
    return name.replace("\\", "/")


def _check_name(archive: Path, name: str) -> None:
    """Refuse absolute member names and names with a ``..`` component."""
    n = _normalise(name)
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n):
        raise UnsafeArchiveError(f"{archive.name}: member {name!r} has an absolute path; refusing to extract")
    if ".." in n.split("/"):
        raise UnsafeArchiveError(f"{archive.name}: member {name!r} has a '..' component; refusing to extract")


def _check_link(archive: Path, name: str, target: str, hard: bool) -> None:
    """Refuse a link whose target lies outside the archive root.

    A symlink's target is relative to the member's folder; a hard link's to the archive root.
    """
    t = _normalise(target)
    if t.startswith("/") or re.match(r"^[A-Za-z]:", t):
        raise UnsafeArchiveError(f"{archive.name}: link {name!r} points to absolute path {target!r}; refusing")
    base = "" if hard else posixpath.dirname(_normalise(name))
    resolved = posixpath.normpath(posixpath.join(base, t))
    if resolved == ".." or resolved.startswith("../"):
        raise UnsafeArchiveError(f"{archive.name}: link {name!r} -> {target!r} points outside the destination; refusing")


def _check_size(archive: Path, dest: Path, total: int, limit: int) -> None:
    """Refuse an archive whose members add up to more than `limit` bytes, or than the free space at `dest`."""
    if total > limit:
        raise UnsafeArchiveError(f"{archive.name}: its files would take {format_gb(total)} once extracted, over the "
                                 f"limit of {format_gb(limit)} (max_bytes; by default {MAX_RATIO}x the archive's size): "
                                 "a zip bomb? Refusing to extract; pass a larger max_bytes if this size is expected")
    ensure_space(dest, total, f"extracting {archive.name}")


def _extract_zip(archive: Path, tmp: Path, limit: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        _check_size(archive, tmp, sum(info.file_size for info in infos), limit)
        for info in infos:
            _check_name(archive, info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):  # zipfile writes links as plain files; still refuse escapes
                _check_link(archive, info.filename, zf.read(info).decode("utf-8", "replace"), hard=False)
        for info in infos:
            zf.extract(info, tmp)


def _extract_tar(archive: Path, tmp: Path, limit: int) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_size(archive, tmp, sum(m.size for m in members if m.isfile()), limit)
        for m in members:
            _check_name(archive, m.name)
            if m.issym() or m.islnk():
                _check_link(archive, m.name, m.linkname, hard=m.islnk())
            elif not (m.isfile() or m.isdir()):
                raise UnsafeArchiveError(f"{archive.name}: member {m.name!r} is a device or fifo; refusing")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: a second, stricter line of defence
            tf.extractall(tmp, members=members, filter="data")
        else:
            tf.extractall(tmp, members=members)


def _rar_tool() -> list[str]:
    for tool, args in (("unrar", ["x", "-o+", "-idq"]), ("7z", ["x", "-y", "-bd"]), ("bsdtar", ["-xf"])):
        if exe := shutil.which(tool):
            return [exe, tool, *args]
    raise RuntimeError(
        "extracting a .rar archive needs 'unrar', '7z' or 'bsdtar' on PATH "
        "(e.g. apt-get install unrar, or p7zip-full, or libarchive-tools)"
    )


def _rar_names(exe: str, tool: str, archive: Path) -> list[str]:
    if tool == "unrar":
        out = subprocess.run([exe, "lb", str(archive)], capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line]
    if tool == "7z":
        out = subprocess.run([exe, "l", "-slt", str(archive)], capture_output=True, text=True, check=True).stdout
        return [line[7:] for line in out.splitlines() if line.startswith("Path = ")][1:]  # first is the archive
    out = subprocess.run([exe, "-tf", str(archive)], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def _extract_rar(archive: Path, tmp: Path, limit: int) -> None:
    """RAR needs an external tool; names are checked first and links after extraction."""
    exe, tool, *args = _rar_tool()
    for name in _rar_names(exe, tool, archive):
        _check_name(archive, name)
    if tool == "unrar":
        cmd = [exe, *args, str(archive.resolve()), str(tmp) + os.sep]
    elif tool == "7z":
        cmd = [exe, *args, f"-o{tmp}", str(archive.resolve())]
    else:
        cmd = [exe, *args, str(archive.resolve()), "-C", str(tmp)]
    subprocess.run(cmd, check=True)
    _check_size(archive, tmp, folder_size(tmp), limit)
    root = tmp.resolve()
    for p in tmp.rglob("*"):
        if p.is_symlink() and not p.resolve().is_relative_to(root):
            raise UnsafeArchiveError(f"{archive.name}: link {p.relative_to(tmp)} points outside the destination")


def _kind(archive: Path) -> str:
    with open(archive, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise ValueError(f"{archive}: not a zip, tar or rar archive")


def _files(dest: Path) -> list[Path]:
    return sorted(p for p in dest.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def extract(archive: str | Path, dest: str | Path, max_bytes: int | None = None) -> list[Path]:
    """Extract ``archive`` into the folder ``dest`` safely; return the extracted files.

    A ``dest`` that already holds this module's completion marker is returned as is. ``dest``
    must otherwise be absent or empty; a non-empty folder that sdnb did not extract is refused
    rather than overwritten. Raises :class:`UnsafeArchiveError` naming a dangerous member, or an
    archive that would extract to more than ``max_bytes`` (see the module docstring).
    """
    archive, dest = Path(archive), Path(dest)
    limit = max_bytes if max_bytes is not None else max(MAX_RATIO * archive.stat().st_size, MIN_LIMIT)
    if (dest / MARKER).is_file():
        return _files(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and was not extracted by sdnb; choose a new or empty folder")
    kind = _kind(archive)
    tmp = dest.with_name(f".{dest.name}.extracting")
    if tmp.exists():  # left over from an interrupted extraction: redo it
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        {"zip": _extract_zip, "tar": _extract_tar, "rar": _extract_rar}[kind](archive, tmp, limit)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / MARKER).write_text(json.dumps({"archive": archive.name, "size": archive.stat().st_size}) + "\n")
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    return _files(dest)
