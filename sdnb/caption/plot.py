"""Looking at captions: HTML tables and a figure of the settings sweep, and the captions beside Unsplash's reference
captions; images embedded as small JPEG ``data:`` URIs so a page needs no other file."""

from __future__ import annotations

import base64
import html
import io
import textwrap
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from PIL import Image

from sdnb.data.captions import read_metadata
from sdnb.data.images import load_rgb

__all__ = ["captions_html", "jpeg_bytes", "sweep_figure", "sweep_html", "thumbnail_uri"]

_STYLE = ("<style>.sdnb-t{border-collapse:collapse;font:13px sans-serif}.sdnb-t td,.sdnb-t th{border:1px solid #ccc;"
          "padding:4px;vertical-align:top;max-width:260px}.sdnb-t th{background:#f4f4f4}"
          ".sdnb-t .ref{color:#666;font-style:italic}</style>")


def jpeg_bytes(image: Image.Image, size: int, quality: int = 85) -> bytes:
    """A JPEG of `image` shrunk to fit `size` x `size`."""
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def thumbnail_uri(image: Image.Image | str | Path, size: int = 160) -> str:
    """A small JPEG of ``image`` as a ``data:`` URI, so an HTML page needs no other file."""
    if not isinstance(image, Image.Image):
        image = load_rgb(image)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(image, size)).decode("ascii")


def _img(uri: str, title: str) -> str:
    return f'<img src="{uri}" title="{html.escape(title)}" style="max-width:160px;max-height:160px">'


def sweep_html(table: Any) -> str:
    """A `SweepTable` as an HTML table: one column per sample image, one row per combination of settings."""
    head = "".join(f"<th>{_img(thumbnail_uri(t), n)}<br><small>{html.escape(n)}</small></th>"
                   for n, t in zip(table.names, table.thumbnails))
    rows = []
    for setting, captions in zip(table.settings, table.captions):
        label = "<br>".join(f"{html.escape(k)} = {html.escape(repr(v))}" for k, v in setting.items()) or "(defaults)"
        cells = "".join(f"<td>{html.escape(c)}<br><small>{len(c.split())} words</small></td>" for c in captions)
        rows.append(f"<tr><th style='white-space:nowrap'>{label}</th>{cells}</tr>")
    return (f"{_STYLE}<table class='sdnb-t'><tr><th>settings</th>{head}</tr>{''.join(rows)}</table>")


def sweep_figure(table: Any, wrap: int = 30) -> Any:
    """A `SweepTable` as a matplotlib figure (for ``grids/sweep.png``): thumbnails on top, one row per setting."""
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
