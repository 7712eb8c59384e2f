"""Caption sidecars and ``metadata.jsonl``: reading, writing atomically, and updating one caption.

The two conventions trainers read: ``image.txt`` beside ``image.jpg`` (EveryDream2, kohya) and a
``metadata.jsonl`` with ``file_name`` (relative to its folder) and ``text`` (Hugging Face ``imagefolder``,
diffusers' ``train_text_to_image.py``). Both are kept in step by :func:`save_caption`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

__all__ = ["read_caption", "read_metadata", "reference_captions", "save_caption", "tidy", "write_caption",
           "write_metadata"]


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
