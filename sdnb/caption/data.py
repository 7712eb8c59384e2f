"""Captioning a whole folder: training copies of the photos, each with a caption, resumable.

Captions land where other trainers look for them: an ``image.txt`` sidecar beside each training copy
(EveryDream2, kohya) and ``metadata.jsonl`` with ``file_name`` and ``text`` (Hugging Face
``imagefolder``, diffusers' ``train_text_to_image.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sdnb.caption.config import GENERATION_PARAMETERS
from sdnb.caption.model import SupportsCaption
from sdnb.data.captions import read_caption, reference_captions, write_caption, write_metadata
from sdnb.data.images import ImageRecord, copy_names, load_rgb, make_training_copies

__all__ = ["CaptionItem", "CaptionResult", "caption_folder"]


@dataclass
class CaptionItem:
    """One training copy: ``file_name`` relative to the output folder, its caption, and where it came from
    (``"generated"``, ``"original"`` = carried over from ``image.txt`` beside the original, ``"kept"`` =
    already beside the copy from an earlier run or an edit)."""

    file_name: str
    text: str
    source: str
    reference: str = ""


@dataclass
class CaptionResult:
    """What :func:`caption_folder` wrote."""

    out_dir: Path
    metadata: Path
    items: list[CaptionItem] = field(default_factory=list)

    def count(self, source: str) -> int:
        return sum(item.source == source for item in self.items)

    def summary(self) -> str:
        return (f"{len(self.items)} captions in {self.out_dir}: {self.count('generated')} generated, "
                f"{self.count('original')} carried over from the originals, {self.count('kept')} kept from before")


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def caption_folder(records: Sequence[ImageRecord], out_dir: str | Path, captioner: SupportsCaption, *,
                   batch_size: int = 8, overwrite: bool = False, long_side: int = 1024, quality: int = 90,
                   progress: bool = True, **gen: Any) -> CaptionResult:
    """Training copies of ``records`` (from :func:`sdnb.images.scan`) in ``out_dir``, each with a caption.

    Per copy, the caption is: the ``image.txt`` already beside it (an earlier, maybe interrupted run,
    or an edit in the reviewer), else the ``image.txt`` beside the original, else BLIP's (``gen``: see
    :meth:`Captioner.caption`). ``overwrite=True`` rewrites the copies and regenerates every caption.
    Sidecars are written atomically as each batch finishes, so an interrupted run resumes where it
    stopped; ``metadata.jsonl`` is rebuilt from the sidecars at the end, with Unsplash's
    ``ai_description`` as ``reference`` where an ``unsplash.jsonl`` lies beside the originals.
    Originals are only read.
    """
    unknown = set(gen) - set(GENERATION_PARAMETERS)
    if unknown:
        raise TypeError(f"caption_folder: unknown generation parameter(s) {', '.join(sorted(unknown))}; "
                        f"accepted: {', '.join(GENERATION_PARAMETERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(records)
    sidecars = [p.with_suffix(".txt") for p in _copy_paths(records, out_dir)]
    sources = ["generated" if overwrite else "kept" if read_caption(s) else
               "original" if read_caption(r.path.with_suffix(".txt")) else "generated"
               for r, s in zip(records, sidecars)]
    copies = make_training_copies(records, out_dir, long_side=long_side, quality=quality, overwrite=overwrite)
    for rec, sidecar, source in zip(records, sidecars, sources):
        if source == "original":  # re-written as clean UTF-8, whatever the original's encoding
            write_caption(sidecar, read_caption(rec.path.with_suffix(".txt")))
    pending = [i for i, source in enumerate(sources) if source == "generated"]
    with tqdm(total=len(pending), desc="captions", disable=not progress) as bar:
        for batch in _batches(pending, batch_size):
            texts = captioner.caption([load_rgb(copies[i]) for i in batch], **gen)
            for i, text in zip(batch, texts):
                write_caption(sidecars[i], text)
            bar.update(len(batch))
    refs: dict[Path, dict[str, str]] = {}
    items = []
    for rec, copy, sidecar, source in zip(records, copies, sidecars, sources):
        if rec.path.parent not in refs:
            refs[rec.path.parent] = reference_captions(rec.path.parent)
        items.append(CaptionItem(copy.relative_to(out_dir).as_posix(), read_caption(sidecar), source,
                                 refs[rec.path.parent].get(rec.path.name, "")))
    metadata = write_metadata(out_dir, (_row(item) for item in items))
    return CaptionResult(out_dir, metadata, items)


def _copy_paths(records: list[ImageRecord], out_dir: Path) -> list[Path]:
    """Where :func:`make_training_copies` puts each copy (same naming), without writing anything."""
    return [out_dir / name for name in copy_names(records)]


def _row(item: CaptionItem) -> dict[str, str]:
    row = {"file_name": item.file_name, "text": item.text}
    if item.reference:
        row["reference"] = item.reference
    return row
