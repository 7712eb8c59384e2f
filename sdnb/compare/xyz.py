"""X/Y/Z sheets (as AUTOMATIC1111's X/Y/Z plot): one prompt, one seed, and 1-3 axes among CFG scale, steps,
checkpoint, scheduler and seed; one figure per value of the third axis."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from tqdm.auto import tqdm

from sdnb.compare.config import XYZ_AXES
from sdnb.compare.sd import generate
from sdnb.viz import image_grid


def xyz_sheet(pipes: dict, load: Callable[[str], object], axes: Mapping[str, Sequence], prompt: str,
              defaults: Mapping, resolution: int = 512, progress: bool = True) -> list[tuple[str, object]]:
    """AUTOMATIC1111-style X/Y/Z sheets: axes (ordered x, y, z; 1-3 of XYZ_AXES) -> one figure per z value.

    `defaults` holds cfg, steps, checkpoint, scheduler and seed for what the axes do not vary: the seed is the
    same in every cell unless 'seed' is an axis. `pipes` caches pipelines by checkpoint name; `load` loads others.
    """
    bad = [a for a in axes if a not in XYZ_AXES]
    if bad or not 1 <= len(axes) <= 3 or not all(len(v) for v in axes.values()):
        raise ValueError(f"xyz_axes={dict(axes)!r}: expected 1-3 axes among {', '.join(XYZ_AXES)}, each with values")
    names = list(axes) + [None] * (3 - len(axes))
    values = [list(axes[n]) if n else [None] for n in names]
    sheets = []
    bar = tqdm(total=len(values[0]) * len(values[1]) * len(values[2]), desc="X/Y/Z sheets", unit="image",
               disable=not progress)
    for z in values[2]:
        rows = []
        for y in values[1]:
            row = []
            for x in values[0]:
                s = dict(defaults)
                s.update({n: v for n, v in zip(names, (x, y, z)) if n})
                if s["checkpoint"] not in pipes:
                    pipes[s["checkpoint"]] = load(s["checkpoint"])
                row.append(generate(pipes[s["checkpoint"]], [prompt], [int(s["seed"])], resolution, int(s["steps"]),
                                    float(s["cfg"]), s["scheduler"], progress=False)[0])
                bar.update()
            rows.append(row)
        title = f"{names[2]} = {_show(z)}" if names[2] else "x/y sheet"
        fig = image_grid(rows, [f"{names[0]} = {_show(x)}" for x in values[0]],
                         [f"{names[1]} = {_show(y)}" for y in values[1]] if names[1] else [""],
                         title=f"{title} | prompt: {prompt[:60]} | fixed: " +
                               ", ".join(f"{k} {_show(v)}" for k, v in defaults.items() if k not in axes))
        sheets.append((title, fig))
    bar.close()
    return sheets


def _show(value) -> str:
    """An axis value as a label ('' is the pipeline's own scheduler; paths are shortened to their last parts)."""
    if value == "":
        return "default"
    text = str(value)
    return text if len(text) < 30 else "..." + text[-27:]
