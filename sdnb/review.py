"""Looking at captions: HTML tables (the sweep, the captions beside reference captions) and an
ipywidgets reviewer that edits a caption and saves it to its sidecar and ``metadata.jsonl``."""

from __future__ import annotations

import base64
import html
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from sdnb.images import load_rgb
from sdnb.sidecars import read_caption, read_metadata, save_caption, tidy

if TYPE_CHECKING:
    from sdnb.caption import SweepTable

__all__ = ["CaptionReviewer", "captions_html", "review", "sweep_figure", "sweep_html", "thumbnail_uri"]

_STYLE = ("<style>.sdnb-t{border-collapse:collapse;font:13px sans-serif}.sdnb-t td,.sdnb-t th{border:1px solid #ccc;"
          "padding:4px;vertical-align:top;max-width:260px}.sdnb-t th{background:#f4f4f4}"
          ".sdnb-t .ref{color:#666;font-style:italic}</style>")


def _jpeg_bytes(image: Image.Image, size: int, quality: int = 85) -> bytes:
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_uri(image: Image.Image | str | Path, size: int = 160) -> str:
    """A small JPEG of ``image`` as a ``data:`` URI, so an HTML page needs no other file."""
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    return "data:image/jpeg;base64," + base64.b64encode(_jpeg_bytes(image, size)).decode("ascii")


def _img(uri: str, title: str) -> str:
    return f'<img src="{uri}" title="{html.escape(title)}" style="max-width:160px;max-height:160px">'


def sweep_html(table: SweepTable) -> str:
    """The sweep as an HTML table: one column per sample image, one row per combination of settings."""
    head = "".join(f"<th>{_img(thumbnail_uri(t), n)}<br><small>{html.escape(n)}</small></th>"
                   for n, t in zip(table.names, table.thumbnails))
    rows = []
    for setting, captions in zip(table.settings, table.captions):
        label = "<br>".join(f"{html.escape(k)} = {html.escape(repr(v))}" for k, v in setting.items()) or "(defaults)"
        cells = "".join(f"<td>{html.escape(c)}<br><small>{len(c.split())} words</small></td>" for c in captions)
        rows.append(f"<tr><th style='white-space:nowrap'>{label}</th>{cells}</tr>")
    return (f"{_STYLE}<table class='sdnb-t'><tr><th>settings</th>{head}</tr>{''.join(rows)}</table>")


def sweep_figure(table: SweepTable, wrap: int = 30) -> Any:
    """The sweep as a matplotlib figure (for ``grids/sweep.png``): thumbnails on top, one row per setting."""
    import textwrap

    import matplotlib.pyplot as plt

    ncols, nrows = len(table.names) + 1, len(table.settings) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 1.9 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for c, (name, thumb) in enumerate(zip(table.names, table.thumbnails), 1):
        axes[0, c].imshow(thumb)
        axes[0, c].set_title(name, fontsize=8)
    for r, (setting, captions) in enumerate(zip(table.settings, table.captions), 1):
        label = "\n".join(f"{k} = {v!r}" for k, v in setting.items())
        axes[r, 0].text(0, 0.5, label, fontsize=8, va="center", weight="bold")
        for c, caption in enumerate(captions, 1):
            lines = textwrap.wrap(caption, wrap)
            text = "\n".join(lines[:7]) + (" ..." if len(lines) > 7 else "")
            axes[r, c].text(0, 1, text, fontsize=7, va="top", family="serif")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout()
    return fig


def captions_html(out_dir: str | Path, n: int = 12, start: int = 0) -> str:
    """Rows of thumbnail | caption | reference caption (if any) for ``n`` images of a captioned folder."""
    out_dir = Path(out_dir)
    rows = read_metadata(out_dir)[start:start + n]
    refs = any(r.get("reference") for r in rows)
    body = []
    for r in rows:
        ref = f"<td class='ref'>{html.escape(r.get('reference', ''))}</td>" if refs else ""
        body.append(f"<tr><td>{_img(thumbnail_uri(out_dir / r['file_name']), r['file_name'])}</td>"
                    f"<td><small>{html.escape(r['file_name'])}</small><br>{html.escape(r['text'])}</td>{ref}</tr>")
    head = "<tr><th>image</th><th>caption</th>" + ("<th>reference (Unsplash)</th>" if refs else "") + "</tr>"
    return f"{_STYLE}<table class='sdnb-t'>{head}{''.join(body)}</table>"


class CaptionReviewer:
    """Step through a captioned folder, edit a caption, save it to its sidecar and ``metadata.jsonl``.

    ``CaptionReviewer(run_dir / "train").widget`` is what a notebook displays; the methods
    (:meth:`show`, :meth:`save`, :meth:`next`, :meth:`prev`) are what its buttons call.
    """

    def __init__(self, out_dir: str | Path, image_size: int = 384) -> None:
        import ipywidgets as w

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
        self.image.value = _jpeg_bytes(load_rgb(path), self.image_size)
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
