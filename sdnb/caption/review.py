"""An ipywidgets reviewer: step through a captioned folder, edit a caption and save it to its sidecar and
``metadata.jsonl`` (a later captioning run keeps the edit)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import ipywidgets as w

from sdnb.caption.plot import jpeg_bytes
from sdnb.data.captions import read_caption, read_metadata, save_caption, tidy
from sdnb.data.images import load_rgb

__all__ = ["CaptionReviewer", "review"]


class CaptionReviewer:
    """Step through a captioned folder, edit a caption, save it to its sidecar and ``metadata.jsonl``.

    ``CaptionReviewer(run_dir / "train").widget`` is what a notebook displays; the methods
    (:meth:`show`, :meth:`save`, :meth:`next`, :meth:`prev`) are what its buttons call.
    """

    def __init__(self, out_dir: str | Path, image_size: int = 384) -> None:
        self.out_dir = Path(out_dir)
        self.rows: list[dict[str, Any]] = read_metadata(self.out_dir)
        if not self.rows:
            raise ValueError(f"{self.out_dir / 'metadata.jsonl'} lists no images to review")
        self.image_size = image_size
        self.index = 0
        self.image = w.Image(format="jpeg", layout=w.Layout(max_width=f"{image_size}px"))
        self.name = w.HTML()
        self.text = w.Textarea(layout=w.Layout(width="100%", height="90px"))
        self.reference = w.HTML()
        self.status = w.HTML()
        self.slider = w.IntSlider(0, min=0, max=len(self.rows) - 1, description="image", continuous_update=False)
        buttons = [w.Button(description=d, icon=i) for d, i in
                   (("prev", "arrow-left"), ("next", "arrow-right"), ("save", "save"), ("save & next", "check"))]
        for button, action in zip(buttons, (self.prev, self.next, self.save, self.save_and_next)):
            button.on_click(lambda _b, act=action: act())
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.text.observe(lambda _c: self._mark(), names="value")
        self.widget = w.VBox([w.HBox([self.slider, *buttons]), self.name, self.image, self.text, self.reference,
                              self.status])
        self.show(0)

    @property
    def file_name(self) -> str:
        return self.rows[self.index]["file_name"]

    def show(self, index: int) -> None:
        """Display image ``index`` (clamped to the folder) with its caption as saved on disk."""
        index = max(0, min(int(index), len(self.rows) - 1))
        if self.slider.value != index:
            self.slider.value = index  # its observer comes back here
            return
        self.index = index
        row = self.rows[index]
        path = self.out_dir / row["file_name"]
        self.image.value = jpeg_bytes(load_rgb(path), self.image_size)
        self.name.value = f"<b>{self.index + 1} / {len(self.rows)}</b> · {html.escape(row['file_name'])}"
        self.text.value = read_caption(path.with_suffix(".txt")) or row.get("text", "")
        ref = row.get("reference", "")
        self.reference.value = f"<i>reference: {html.escape(ref)}</i>" if ref else ""
        self.status.value = ""

    def _mark(self) -> None:
        saved = read_caption((self.out_dir / self.file_name).with_suffix(".txt"))
        self.status.value = "" if tidy(self.text.value) == saved else "<span style='color:#b60'>unsaved</span>"

    def save(self) -> Path:
        """Write the text box to the current image's sidecar and ``metadata.jsonl``."""
        sidecar = save_caption(self.out_dir, self.file_name, self.text.value)
        self.rows[self.index]["text"] = read_caption(sidecar)
        self.status.value = f"<span style='color:#080'>saved {html.escape(sidecar.name)}</span>"
        return sidecar

    def next(self) -> None:
        self.show(self.index + 1)

    def prev(self) -> None:
        self.show(self.index - 1)

    def save_and_next(self) -> None:
        self.save()
        self.next()


def review(out_dir: str | Path, image_size: int = 384) -> Any:
    """The reviewer widget for a captioned folder, ready to display."""
    return CaptionReviewer(out_dir, image_size).widget
