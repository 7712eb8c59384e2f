"""04_compare's pictures and tables, and `run_dir/report.html`: one self-contained page (images embedded as
base64 PNG, no script, no external asset) that opens in any browser without Jupyter."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from sdnb.viz import to_uint8

NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID", "fid": "FID", "kid": "KID", "clip": "CLIP score"}


def image_grid(rows: Sequence[Sequence[torch.Tensor]], col_titles: Sequence[str], row_titles: Sequence[str],
               title: str = "", size: float = 2.0) -> plt.Figure:
    """A grid of images in [-1, 1] (rows of equal length) with column and row titles."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(size * n_cols, size * n_rows + 0.4), squeeze=False)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            ax = axes[r, c]
            ax.imshow(to_uint8(image))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=8)
            if c == 0 and row_titles[r]:
                ax.set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def samples_grid(samples: Mapping[str, torch.Tensor], prompts: Sequence[str], seeds: Sequence[int], n: int = 8) -> plt.Figure:
    """Generated images side by side: one row per model, one column per (prompt, seed), the same in every row."""
    import textwrap

    n = min(n, len(prompts))
    cols = [f"seed {seeds[i]}\n" + "\n".join(textwrap.wrap(prompts[i], 26)[:3]) for i in range(n)]
    return image_grid([[v[i] for i in range(n)] for v in samples.values()], cols, list(samples))


def _num(x: float) -> str:
    return f"{x:.4g}"


def cell(e: Mapping) -> str:
    """'value [low, high] n=N' (with ' vs M' for a reference set, '± std' for KID)."""
    text = _num(e["value"])
    if "std" in e:
        text += f" ± {_num(e['std'])} (subsets of {e['subset_size']})"
    if e.get("ci95"):
        text += f" [{_num(e['ci95'][0])}, {_num(e['ci95'][1])}]"
    text += f" n={e['n']}" + (f" vs {e['n_ref']}" if "n_ref" in e else "")
    if "ties" in e and e["ties"]:
        text += f" (ties {e['ties']:.0%})"
    return text


@dataclass
class Table:
    """A titled table of strings."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


def tables(section: Mapping) -> list[Table]:
    """The tables of a VAE or SD metrics section (`sdnb.compare.compare_vaes` / `sdnb.compare_sd.sd_metrics`)."""
    labels, out = section.get("labels", {}), []
    models = section.get("models", {})
    keys = [k for k in NAMES if any(k in m for m in models.values())]
    if models:
        t = Table("Each model (95% bootstrap interval in brackets, n = images)", ["metric", *models])
        t.rows = [[labels.get(k, NAMES[k])] + [cell(m[k]) if k in m else "-" for m in models.values()] for k in keys]
        out.append(t)
    for group, title in (("wins", "Share of images on which the first model is better"),
                         ("change", "How far apart the two models' outputs are (identical models: PSNR = cap, "
                                    "SSIM 1, LPIPS 0, rFID 0)"),
                         ("between", "Between the two sample sets (identical models: 0)")):
        if section.get(group):
            ks = [k for k in NAMES if any(k in v for v in section[group].values())]
            t = Table(title, ["pair", *[labels.get(k, NAMES[k]) if group != "between" else labels.get("fid_between", k)
                                        for k in ks]])
            t.rows = [[pair] + [cell(v[k]) if k in v else "-" for k in ks] for pair, v in section[group].items()]
            out.append(t)
    if "kl" in section:
        t = Table(labels.get("kl", "KL divergence"), ["KL(P || Q)", "value [95% interval] n = Q's images vs P's"])
        t.rows = [[pair, cell(v)] for pair, v in section["kl"].items() if isinstance(v, dict) and "value" in v]
        t.rows.append(["clusters", str(section["kl"]["k"])])
        out.append(t)
    return out


def text_table(section: Mapping) -> str:
    """The tables as plain text (for the notebook's output)."""
    lines = [section["description"]] if section.get("description") else []
    for t in tables(section):
        widths = [max(len(str(r[i])) for r in [t.header, *t.rows]) for i in range(len(t.header))]
        lines += ["", t.title, "  ".join(h.ljust(w) for h, w in zip(t.header, widths))]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in t.rows]
    notes = [v for k, v in section.get("labels", {}).items() if k.endswith("note")]
    return "\n".join(lines + notes)


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
       ".note{font-size:13px;color:#444}")


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
