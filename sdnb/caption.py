"""BLIP captioning: a batched captioner, captioning a whole folder (resumable), and a settings sweep.

Captions land where other trainers look for them: an ``image.txt`` sidecar beside each training copy
(EveryDream2, kohya) and ``metadata.jsonl`` with ``file_name`` and ``text`` (Hugging Face
``imagefolder``, diffusers' ``train_text_to_image.py``).

Lengths are counted in tokens generated *after* the prompt (``min_new_tokens`` / ``max_new_tokens``),
so a prompt does not eat into them. A conditional ``prompt`` (e.g. ``"a photograph of"``) is BLIP's text
to continue from and is **kept** at the start of the caption, as BLIP returns it; ``prefix`` and
``suffix`` are plain text glued on as given (``suffix=" unsplash photography"``, as in the report).
"""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from sdnb.images import ImageRecord, load_rgb, make_training_copies
from sdnb.sidecars import read_caption, reference_captions, tidy, write_caption, write_metadata

__all__ = [
    "Captioner", "CaptionItem", "CaptionResult", "SweepTable", "caption_folder", "load_captioner", "sweep",
]

GEN_PARAMS = ("num_beams", "min_length", "max_length", "repetition_penalty", "top_p", "prompt", "prefix", "suffix",
              "seed")
_DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SupportsCaption(Protocol):
    def caption(self, images: list[Image.Image], **gen: Any) -> list[str]: ...


@dataclass
class Captioner:
    """A BLIP processor and captioning model on one device; see :func:`load_captioner`."""

    processor: Any
    model: Any
    device: torch.device
    dtype: torch.dtype

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], *, num_beams: int = 4, min_length: int = 5, max_length: int = 30,
                repetition_penalty: float = 1.0, top_p: float | None = None, prompt: str = "", prefix: str = "",
                suffix: str = "", seed: int = 0) -> list[str]:
        """Caption a batch of images: ``prefix + BLIP's caption + suffix`` for each.

        Beam search with ``num_beams`` beams, or nucleus sampling when ``top_p`` is set (one beam, as in
        BLIP's own code; ``seed`` makes it repeatable). ``min_length``/``max_length`` count the tokens
        generated after ``prompt`` (a ``min_length`` above ``max_length`` is lowered to it).
        ``repetition_penalty`` > 1 fights the repetition that long minimum lengths cause (the report's
        ``q_factor`` = 1.4).
        """
        _check_gen(num_beams=num_beams, min_length=min_length, max_length=max_length,
                   repetition_penalty=repetition_penalty, top_p=top_p)
        if not images:
            return []
        min_length = min(min_length, max_length)  # e.g. a sweep row with a short max_length
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        text = [prompt.strip()] * len(images) if prompt.strip() else None
        inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        search = dict(do_sample=True, top_p=top_p, num_beams=1) if top_p is not None else dict(num_beams=num_beams)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # only matters for sampling; the caller's random state is restored after
            out = self.model.generate(**inputs, min_new_tokens=min_length, max_new_tokens=max_length,
                                      repetition_penalty=repetition_penalty, **search)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [f"{prefix}{tidy(t)}{suffix}" for t in texts]


def _check_gen(*, num_beams: int, min_length: int, max_length: int, repetition_penalty: float,
               top_p: float | None) -> None:
    """Fail naming the generation parameter that is out of range."""
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be >= 1")
    if min_length < 0:
        raise ValueError(f"min_length={min_length} must be >= 0")
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1.0 = no penalty)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1], or None for beam search")


def load_captioner(model_id: str | Path, device: str | torch.device = "cpu",
                   dtype: torch.dtype | str | None = None) -> Captioner:
    """Load a BLIP captioner (``BlipProcessor`` + ``BlipForConditionalGeneration``) from a hub id or folder.

    ``dtype``: a torch dtype or a mixed-precision name (``"no"``, ``"fp16"``, ``"bf16"``, ``"auto"``);
    None or ``"auto"`` = fp16 on CUDA, fp32 elsewhere.
    """
    from transformers import BlipForConditionalGeneration, BlipProcessor

    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} must be a torch dtype or one of {', '.join(_DTYPES)}, 'auto'")
        dtype = _DTYPES[dtype]
    name = str(model_id)
    if not Path(name).exists() and (Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") != 1):
        raise FileNotFoundError(f"no BLIP folder at {name!r} (a hub id looks like "
                                "'Salesforce/blip-image-captioning-base')")
    try:
        processor = BlipProcessor.from_pretrained(str(model_id))
        model = BlipForConditionalGeneration.from_pretrained(str(model_id))
    except OSError as e:
        raise OSError(f"could not load a BLIP captioner from {model_id!r}: {e}") from e
    return Captioner(processor, model.to(device=device, dtype=dtype).eval(), device, dtype)


# ---------------------------------------------------------------- a folder of photos


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
    unknown = set(gen) - set(GEN_PARAMS)
    if unknown:
        raise TypeError(f"caption_folder: unknown generation parameter(s) {', '.join(sorted(unknown))}; "
                        f"accepted: {', '.join(GEN_PARAMS)}")
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
    from sdnb.images import _copy_names

    return [out_dir / name for name in _copy_names(records)]


def _row(item: CaptionItem) -> dict[str, str]:
    row = {"file_name": item.file_name, "text": item.text}
    if item.reference:
        row["reference"] = item.reference
    return row


# ---------------------------------------------------------------- choosing settings by eye


@dataclass
class SweepTable:
    """Captions for each combination of settings (rows) on a few sample images (columns)."""

    names: list[str]
    thumbnails: list[Image.Image]
    settings: list[dict[str, Any]]
    captions: list[list[str]]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per (setting, image): the settings, ``image`` and ``caption``."""
        return [{**s, "image": n, "caption": c} for s, caps in zip(self.settings, self.captions)
                for n, c in zip(self.names, caps)]

    def to_html(self) -> str:
        from sdnb.review import sweep_html

        return sweep_html(self)

    def _repr_html_(self) -> str:
        return self.to_html()

    def save(self, path: str | Path) -> Path:
        """Write the table as ``.html`` (self-contained, full captions) or as a picture (``.png``...)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".html", ".htm"):
            path.write_text(self.to_html(), encoding="utf-8")
            return path
        import matplotlib.pyplot as plt

        from sdnb.review import sweep_figure

        with warnings.catch_warnings():  # the tiny BLIP's made-up words include glyphs the font lacks
            warnings.filterwarnings("ignore", message="Glyph .* missing")
            fig = sweep_figure(self)
            fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path


def sweep(captioner: SupportsCaption, images: Sequence[ImageRecord | str | Path | Image.Image],
          grid: dict[str, list], *, n: int = 5, seed: int = 0, thumb: int = 160, **fixed: Any) -> SweepTable:
    """Caption ``n`` images (a sample chosen by ``seed``) with every combination of the values in ``grid``.

    ``grid`` maps generation parameters to the values to try, e.g.
    ``{"repetition_penalty": [1.0, 1.4], "min_length": [5, 22]}``; ``fixed`` holds the others.
    """
    bad = (set(grid) | set(fixed)) - set(GEN_PARAMS)
    if bad:
        raise ValueError(f"sweep: unknown parameter(s) {', '.join(sorted(bad))}; accepted: {', '.join(GEN_PARAMS)}")
    empty = [k for k, v in grid.items() if not isinstance(v, (list, tuple)) or not v]
    if empty:
        raise ValueError(f"sweep: grid values must be non-empty lists; not so for {', '.join(empty)}")
    images = list(images)
    if not images:
        raise ValueError("sweep: no images to caption")
    picked = sorted(random.Random(seed).sample(range(len(images)), min(n, len(images))))
    loaded = [_load(images[i]) for i in picked]
    names = [_name(images[i], i) for i in picked]
    settings = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    captions = [captioner.caption(loaded, **{"seed": seed, **fixed, **s}) for s in tqdm(settings, desc="sweep")]
    thumbs = []
    for im in loaded:
        im = im.copy()
        im.thumbnail((thumb, thumb))
        thumbs.append(im)
    return SweepTable(names, thumbs, settings, captions)


def _load(item: ImageRecord | str | Path | Image.Image) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    return load_rgb(item.path if isinstance(item, ImageRecord) else item)


def _name(item: ImageRecord | str | Path | Image.Image, index: int) -> str:
    if isinstance(item, ImageRecord):
        return item.relpath
    return f"image {index}" if isinstance(item, Image.Image) else Path(item).name
