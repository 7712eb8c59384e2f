"""Choosing BLIP's settings by eye: every combination of a few generation settings on a few sample photos."""

from __future__ import annotations

import itertools
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from PIL import Image
from tqdm.auto import tqdm

from sdnb.caption.config import GENERATION_PARAMETERS
from sdnb.caption.model import SupportsCaption
from sdnb.caption.plot import sweep_figure, sweep_html
from sdnb.data.images import ImageRecord, load_rgb

__all__ = ["SweepTable", "sweep"]


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
        """The table as self-contained HTML (thumbnails embedded)."""
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
    bad = (set(grid) | set(fixed)) - set(GENERATION_PARAMETERS)
    if bad:
        raise ValueError(f"sweep: unknown parameter(s) {', '.join(sorted(bad))}; accepted: {', '.join(GENERATION_PARAMETERS)}")
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
