"""Captions: sidecars and ``metadata.jsonl``, reading (one reader for every stage), writing atomically, and
updating one caption.

The two conventions trainers read: ``image.txt`` beside ``image.jpg`` (EveryDream2, kohya) and a
``metadata.jsonl`` with ``file_name`` (relative to its folder) and ``text`` (Hugging Face ``imagefolder``,
diffusers' ``train_text_to_image.py``). Both are kept in step by :func:`save_caption`; :func:`read_captions`
reads a folder of captioned images (sidecar first, else ``metadata.jsonl``), keyed by full path.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sdnb.data.images import find_images

__all__ = ["CaptionedImage", "read_caption", "read_captions", "read_metadata", "reference_captions", "save_caption",
           "tidy", "write_caption", "write_metadata"]


def tidy(text: str) -> str:
    """One line, single spaces."""
    return re.sub(r"\s+", " ", text).strip()


def write_caption(path: str | Path, text: str) -> Path:
    """Write a caption sidecar as one UTF-8 line, atomically (a crash never leaves half a caption)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(tidy(text) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_metadata(out_dir: str | Path, rows: Iterable[dict[str, str]]) -> Path:
    """Write ``out_dir/metadata.jsonl`` atomically, one JSON object per line."""
    out = Path(out_dir) / "metadata.jsonl"
    tmp = out.with_name(".metadata.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, out)
    return out


def read_metadata(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``metadata.jsonl`` (a folder means ``folder/metadata.jsonl``)."""
    path = Path(path)
    path = path / "metadata.jsonl" if path.is_dir() else path
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def reference_captions(folder: str | Path) -> dict[str, str]:
    """``{file name: ai_description}`` from ``folder/unsplash.jsonl`` (written by ``fetch_unsplash_lite``), or {}."""
    path = Path(folder) / "unsplash.jsonl"
    if not path.is_file():
        return {}
    refs = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}, line {n}: not JSON, skipped ({e})", stacklevel=2)
                continue
            if isinstance(row, dict) and row.get("file_name") and row.get("ai_description"):
                refs[row["file_name"]] = tidy(row["ai_description"])
    return refs


def read_caption(path: str | Path) -> str:
    """The caption in a sidecar, whitespace tidied ('' if there is none); UTF-8 (with or without BOM),
    else Windows-1252/Latin-1."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = path.read_bytes()
    for encoding in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            return tidy(data.decode(encoding))
        except UnicodeDecodeError:
            continue
    return ""  # unreachable: latin-1 decodes any bytes


def save_caption(out_dir: str | Path, file_name: str, text: str) -> Path:
    """Set the caption of ``out_dir/file_name``: its ``.txt`` sidecar and its row in ``metadata.jsonl``.

    Other rows, and other columns of this row (e.g. ``reference``), are kept; a missing row is added.
    Returns the sidecar's path.
    """
    out_dir = Path(out_dir)
    image = out_dir / file_name
    if not image.is_file():
        raise FileNotFoundError(f"save_caption: no image {image}")
    text = tidy(text)
    sidecar = write_caption(image.with_suffix(".txt"), text)
    rows = read_metadata(out_dir) if (out_dir / "metadata.jsonl").is_file() else []
    for row in rows:
        if row.get("file_name") == file_name:
            row["text"] = text
            break
    else:
        rows.append({"file_name": file_name, "text": text})
    write_metadata(out_dir, rows)
    return sidecar


@dataclass(frozen=True)
class CaptionedImage:
    """An image file, its caption and its size as displayed."""

    path: Path
    caption: str
    width: int
    height: int


def metadata_captions(folder: str | Path) -> dict[Path, str]:
    """Captions from every `metadata.jsonl` under `folder`, keyed by the image's resolved path."""
    found: dict[Path, str] = {}
    for meta in sorted(Path(folder).rglob("metadata.jsonl")):
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                found[(meta.parent / row["file_name"]).resolve()] = tidy(str(row["text"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{meta}:{n}: expected a JSON object with 'file_name' and 'text' ({err})") from err
    return found


def read_captions(folder: str | Path, parameter: str = "data_dir", keep_uncaptioned: bool = False,
                  progress: bool = True) -> list[CaptionedImage]:
    """Every usable image under `folder` with its caption: the `image.txt` sidecar, else its `metadata.jsonl` row.

    Images without a caption are left out with a warning naming a few (or kept with caption '' when
    `keep_uncaptioned`); files that do not decode are reported by `find_images`. Fails naming `parameter` when
    nothing is left.
    """
    records = find_images(folder, parameter, progress=progress)
    metadata = metadata_captions(folder)
    out, uncaptioned = [], []
    for rec in records:
        sidecar = rec.path.with_suffix(".txt")
        caption = read_caption(sidecar) if sidecar.is_file() else metadata.get(rec.path.resolve())
        if caption is None:
            uncaptioned.append(rec.relpath)
            if not keep_uncaptioned:
                continue
        out.append(CaptionedImage(rec.path, caption or "", rec.width, rec.height))
    if uncaptioned and not keep_uncaptioned:
        warnings.warn(f"{len(uncaptioned)} images in {folder} have no caption (no .txt sidecar, not in metadata.jsonl) "
                      f"and are left out, e.g. {', '.join(uncaptioned[:3])}", stacklevel=2)
    if not out:
        raise ValueError(f"{parameter}={str(folder)!r} holds no captioned image: put a caption in image.txt next to "
                         "each image.jpg, or a metadata.jsonl with 'file_name' and 'text'")
    return out
