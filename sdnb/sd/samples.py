"""Samples of a run: fixed prompts, fixed seeds and several CFG scales at every checkpoint, one grid per
checkpoint (run_dir/samples/step-N.png), and a sheet across checkpoints (rows: checkpoints, columns: prompts)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from sdnb.train.checkpoint import step_of


def labelled_grid(rows: list[list[Any]], col_titles: list[str], row_titles: list[str], title: str = "",
                  min_tile: int = 128) -> Image.Image:
    """A PIL grid of PIL images (None leaves a blank) with a title band over each column and at the left of each row."""
    first = next(im for row in rows for im in row if im is not None)
    scale = max(1, -(-min_tile // first.width))
    tw, th = first.width * scale, first.height * scale
    font = ImageFont.load_default(size=12)
    left, top, head = 70, 30 if title else 0, 46
    grid = Image.new("RGB", (left + len(col_titles) * (tw + 4), top + head + len(rows) * (th + 4)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((left, 8), title, fill="black", font=font)
    for j, text in enumerate(col_titles):
        lines = textwrap.wrap(text, max(8, tw // 7))[:3]
        draw.multiline_text((left + j * (tw + 4), top + 2), "\n".join(lines), fill="black", font=font)
    for r, row in enumerate(rows):
        y = top + head + r * (th + 4)
        draw.multiline_text((4, y + th // 2 - 8), "\n".join(textwrap.wrap(row_titles[r], 10)[:2]), fill="black", font=font)
        for j, image in enumerate(row):
            if image is not None:
                grid.paste(image.convert("RGB").resize((tw, th), Image.NEAREST), (left + j * (tw + 4), y))
    return grid


@torch.no_grad()
def render_samples(pipe, prompts: list[str], cfg_scales: list[float], out_dir: str | Path, seed: int = 0,
                   steps: int = 30, size: int = 512, negative_prompt: str = "", title: str = "",
                   progress: bool = True) -> Path:
    """Every prompt at every CFG scale, prompt j always from seed + j: PNGs in out_dir/ and the grid out_dir.png
    (rows: CFG scales, columns: prompts); one progress bar over the images (the pipeline's own is off)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=len(cfg_scales) * len(prompts), desc=f"sample grid{' ' + title if title else ''} "
              f"({steps} steps, {size} px)", unit="image", disable=not progress) as bar:
        for scale in cfg_scales:
            row = []
            for j, prompt in enumerate(prompts):
                image = pipe(prompt, negative_prompt=negative_prompt or None, guidance_scale=scale, height=size,
                             width=size, num_inference_steps=steps,
                             generator=torch.Generator().manual_seed(seed + j)).images[0]
                image.save(out_dir / f"p{j}_cfg{scale:g}.png")
                row.append(image)
                bar.update()
            rows.append(row)
    (out_dir / "prompts.json").write_text(json.dumps({"prompts": prompts, "cfg_scales": cfg_scales, "seed": seed,
                                                      "negative_prompt": negative_prompt, "steps": steps}))
    path = out_dir.with_suffix(".png")
    labelled_grid(rows, prompts, [f"CFG {c:g}" for c in cfg_scales], title).save(path)
    return path


def sample_sheet(samples_dir: str | Path, cfg_scale: float | None = None) -> Any:
    """Rows: every sampled step (step 0 = the base model); columns: prompts; at one CFG scale (default the first).
    A PIL image, or None when nothing was sampled."""
    rows = sorted(p for p in Path(samples_dir).glob("step-*") if p.is_dir() and (p / "prompts.json").exists())
    if not rows:
        return None
    meta = json.loads((rows[-1] / "prompts.json").read_text())
    scale = meta["cfg_scales"][0] if cfg_scale is None else cfg_scale
    files = [[row / f"p{j}_cfg{scale:g}.png" for j in range(len(meta["prompts"]))] for row in rows]
    images = [[Image.open(f).convert("RGB") if f.exists() else None for f in row] for row in files]
    return labelled_grid(images, meta["prompts"], [f"step {step_of(row)}" for row in rows],
                      f"samples by checkpoint at CFG {scale:g}, fixed seeds")
