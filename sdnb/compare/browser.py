"""An ipywidgets browser: pick an image, zoom into a region, switch between original, models and error maps.

Vessel artefacts are a few pixels wide: the zoomed region is enlarged with nearest-neighbour sampling, so
one image pixel stays a visible square. Error maps share one colour scale across models and images.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import ipywidgets as w
import matplotlib
import numpy as np
import torch
from PIL import Image

from sdnb.data.images import to_array
from sdnb.viz import error_map


class Browser:
    """`Browser(items)` where each item is (title, {view name: (3, H, W) image in [-1, 1]}); views of one item share
    a size. With `reference` (e.g. 'original') an error view '|name - original|' is added for every other view.

    `widget` is the ipywidgets box (also shown when the Browser is the last expression of a cell); `render()`
    returns the PNG that is displayed, so a test can drive the controls without a front end.
    """

    def __init__(self, items: Sequence[tuple[str, Mapping[str, torch.Tensor]]], reference: str | None = "original",
                 display_size: int = 512, vmax: float | None = None):
        if not items:
            raise ValueError("Browser needs at least one item")
        self.items, self.reference, self.display_size = list(items), reference, display_size
        views = list(self.items[0][1])
        errors = [f"|{v} - {reference}|" for v in views if reference in views and v != reference]
        self.vmax = vmax if vmax is not None else self._shared_vmax() if errors else 1.0
        self.pick = w.Dropdown(options=[(t, i) for i, (t, _) in enumerate(self.items)], value=0, description="image")
        self.view = w.ToggleButtons(options=views + errors, value=views[0], description="show")
        self.zoom = w.FloatLogSlider(value=1, base=2, min=0, max=5, step=0.5, description="zoom")
        self.cx = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="centre x")
        self.cy = w.FloatSlider(value=0.5, min=0, max=1, step=0.01, description="centre y")
        self.image = w.Image(format="png", width=display_size, height=display_size)
        self.caption = w.HTML()
        for control in (self.pick, self.view, self.zoom, self.cx, self.cy):
            control.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.pick, self.zoom]), self.view, w.HBox([self.cx, self.cy]), self.image,
                              self.caption])
        self.update()

    @classmethod
    def for_vaes(cls, comparison, full_images: Sequence = (), n: int = 16, **kwargs) -> "Browser":
        """Whole held-out images (`sdnb.vae.whole_images`) first, then the first `n` held-out patches of a
        `VAEComparison`: original, each VAE, and each VAE's error map."""
        items = [(f"{name} (full size)", {"original": original, **recons}) for name, original, recons in full_images]
        items += [(f"held-out patch {i}", {"original": comparison.originals[i], **{k: r[i] for k, r in comparison.recons.items()}})
                  for i in range(min(n, len(comparison.originals)))]
        return cls(items, **kwargs)

    @classmethod
    def for_samples(cls, samples: Mapping[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int],
                    **kwargs) -> "Browser":
        """Generated images: one item per (prompt, seed), one view per pipeline."""
        items = [(f"{i}: seed {seeds[i]}, {prompts[i][:50]}", {k: v[i] for k, v in samples.items()})
                 for i in range(len(prompts))]
        return cls(items, reference=None, **kwargs)

    def _shared_vmax(self) -> float:
        maps = [error_map(v, views[self.reference]) for _, views in self.items for k, v in views.items() if k != self.reference]
        return float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99)) or 1e-3

    def pixels(self) -> np.ndarray:
        """The current view of the current image at full resolution (H, W, 3) uint8."""
        views = self.items[self.pick.value][1]
        name = self.view.value
        if name.startswith("|"):
            model = name[1:].split(" - ")[0]
            err = error_map(views[model], views[self.reference]) / self.vmax
            return (matplotlib.colormaps["inferno"](np.clip(err, 0, 1))[..., :3] * 255).astype(np.uint8)
        return to_array(views[name])

    def region(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the zoomed region in image pixels."""
        h, w = self.pixels().shape[:2]
        side_w, side_h = max(1, round(w / self.zoom.value)), max(1, round(h / self.zoom.value))
        left = int(np.clip(round(self.cx.value * w - side_w / 2), 0, w - side_w))
        top = int(np.clip(round(self.cy.value * h - side_h / 2), 0, h - side_h))
        return left, top, left + side_w, top + side_h

    def render(self) -> bytes:
        """PNG bytes of the zoomed region, enlarged to `display_size` with nearest-neighbour sampling."""
        crop = Image.fromarray(self.pixels()).crop(self.region())
        scale = self.display_size / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.NEAREST)
        buffer = io.BytesIO()
        crop.save(buffer, format="PNG")
        return buffer.getvalue()

    def update(self) -> None:
        """Redraw after a control changed."""
        self.image.value = self.render()
        left, top, right, bottom = self.region()
        note = f" (error colour scale 0 to {self.vmax:.3f} of the intensity range)" if self.view.value.startswith("|") else ""
        self.caption.value = (f"<small>{self.items[self.pick.value][0]}: {self.view.value}, pixels x {left}-{right}, "
                              f"y {top}-{bottom}{note}</small>")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)
