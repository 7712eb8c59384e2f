"""04_compare's pictures and tables, and `run_dir/report.html`: one self-contained page (images embedded as
base64 PNG, no script, no external asset) that opens in any browser without Jupyter."""

from __future__ import annotations

import base64
import html
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from sdnb.stats import Table, tables
from sdnb.viz import image_grid


def samples_grid(samples: Mapping[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int], n: int = 8) -> plt.Figure:
    """Generated images side by side: one row per model, one column per (prompt, seed), the same in every row."""
    n = min(n, len(prompts))
    cols = [f"seed {seeds[i]}\n" + "\n".join(textwrap.wrap(prompts[i], 26)[:3]) for i in range(n)]
    return image_grid([[v[i] for i in range(n)] for v in samples.values()], cols, list(samples))


def _img(path: str | Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in t.rows)
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Section:
    """One part of the report: a heading, a short story, its metrics and its pictures (caption, PNG path)."""

    heading: str
    text: str = ""
    metrics: Mapping | None = None
    figures: list[tuple[str, str | Path]] = field(default_factory=list)


CSS = ("body{font-family:sans-serif;max-width:1150px;margin:1em auto;color:#222}table{border-collapse:collapse;"
       "margin:.5em 0}td,th{border:1px solid #999;padding:3px 8px;font-size:13px;text-align:left}th{background:#eee}"
       "img{max-width:100%;border:1px solid #ccc}figure{margin:1em 0}figcaption{font-size:13px;color:#555}"
       ".note{font-size:13px;color:#444}.verdict{background:#f4f4e8;padding:6px 10px;border-left:4px solid #997}")


def write_report(path: str | Path, title: str, sections: Sequence[Section], footer: str = "") -> Path:
    """Write the self-contained HTML report and return its path."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s.heading)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.metrics is None:
            parts.append("<p class='note'>Not run.</p>")
        else:
            if s.metrics.get("description"):
                parts.append(f"<p class='note'>{html.escape(s.metrics['description'])}</p>")
            parts += [_html_table(t) for t in tables(s.metrics)]
            notes = [v for k, v in s.metrics.get("labels", {}).items() if k.endswith("note")]
            parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
            if s.metrics.get("verdict"):
                parts.append(f"<p class='verdict'><b>In words:</b> {html.escape(s.metrics['verdict'])}</p>")
        parts += [_img(p, c) for c, p in s.figures if Path(p).is_file()]
        parts.append("</section>")
    if footer:
        parts.append(f"<p class='note'>{html.escape(footer)}</p>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


VAE_TEXT = ("The same fixed held-out images through each VAE (posterior mode). Grids: original | reconstructions | "
            "|reconstruction - original| on one colour scale, so a darker map really is a smaller error. Look for "
            "artefacts along thin structures such as vessels.")
SD_TEXT = ("The same prompts and seeds through both pipelines: only the weights differ. Look for 'burnt' colours and "
           "smoothed-out details. X/Y/Z sheets keep the seed fixed across cells.")


def write_compare_report(run_dir: str | Path, vae: Mapping | None, sd: Mapping | None, title: str = "") -> Path:
    """run_dir/report.html for 04_compare: a VAE section and an SD section with the PNGs in run_dir/grids
    (vae_*.png, sd_*.png, xyz_*.png), every metric with its sample size."""
    run_dir = Path(run_dir)
    grids = run_dir / "grids"
    pick = lambda *prefixes: [(p.stem.replace("_", " "), p) for pre in prefixes  # noqa: E731
                              for p in sorted(grids.glob(f"{pre}_*.png"))]
    sections = [Section("VAE: held-out reconstructions", VAE_TEXT, vae, pick("vae")),
                Section("Stable Diffusion: base vs fine-tuned", SD_TEXT, sd, pick("sd", "xyz"))]
    return write_report(run_dir / "report.html", title or f"04_compare: base vs fine-tuned ({run_dir.name})", sections,
                        footer="Written by sdnb 04_compare; numbers and settings also in metrics.json and config.json.")
