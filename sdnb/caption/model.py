"""BLIP: a batched captioner (`Captioner`) and its loader.

Lengths are counted in tokens generated *after* the prompt (``min_new_tokens`` / ``max_new_tokens``),
so a prompt does not eat into them. A conditional ``prompt`` (e.g. ``"a photograph of"``) is BLIP's text
to continue from and is **kept** at the start of the caption, as BLIP returns it; ``prefix`` and
``suffix`` are plain text glued on as given (``suffix=" unsplash photography"``, as in the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

from sdnb.data.captions import tidy
from sdnb.models import is_hub_id
from sdnb.runtime import weights_dtype

__all__ = ["Captioner", "SupportsCaption", "load_captioner"]


class SupportsCaption(Protocol):
    """Anything that captions a batch of images (a `Captioner`, or a stand-in in tests)."""

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

    ``dtype``: a torch dtype or a mixed-precision name (``"no"``, ``"fp16"``, ``"bf16"``, ``"auto"``, as
    `runtime.weights_dtype` reads it: half precision on a GPU only); None = ``"auto"``.
    """
    device = torch.device(device)
    if not isinstance(dtype, torch.dtype):
        try:
            dtype = weights_dtype(dtype or "auto", device)
        except ValueError as err:
            raise ValueError(f"dtype={dtype!r} must be a torch dtype or 'auto', 'no', 'fp32', 'fp16', 'bf16'") from err
    name = str(model_id)
    if not Path(name).exists() and not is_hub_id(name):
        raise FileNotFoundError(f"no BLIP folder at {name!r} (a hub id looks like "
                                "'Salesforce/blip-image-captioning-base')")
    try:
        processor = BlipProcessor.from_pretrained(str(model_id))
        model = BlipForConditionalGeneration.from_pretrained(str(model_id))
    except OSError as e:
        raise OSError(f"could not load a BLIP captioner from {model_id!r}: {e}") from e
    return Captioner(processor, model.to(device=device, dtype=dtype).eval(), device, dtype)
