"""Run the whole notebook suite headless on the embedded default and leave the results under one folder.

    python -m sdnb.demo --out runs/demo

writes `OUT/assets/` (tiny models and images), `OUT/NN_name/` (each notebook's run_dir),
`OUT/notebooks/NN_name.ipynb|.html` (executed notebooks) and `OUT/index.html`.
"""

from __future__ import annotations

import argparse
import html
import shutil
import time
from pathlib import Path

import papermill

from sdnb.demo.sets import PHOTO_CAPTIONS, SCOPE_CAPTIONS
from sdnb.demo.tiny import TinyAssets, build

NOTEBOOKS = ("01_captioning", "02_vae_finetune", "03_sd_finetune", "04_compare")
REPO_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def demo_parameters(assets: TinyAssets, out: str | Path, scale: float = 1.0) -> dict[str, dict]:
    """Papermill parameters that run each notebook on the tiny models; `scale` < 1 shortens training (tests).

    The story: 01 captions the scope images (microscope and telescope tiles) with the tiny BLIP, 03 fine-tunes the
    photo-pre-trained tiny SD on them (120 steps at lr 2e-3: its samples visibly move towards them), 04 compares.
    """
    out = Path(out)
    steps = lambda n: max(2, int(n * scale))  # noqa: E731
    common = dict(device="cpu", mixed_precision="no", seed=0, sync_dir="")
    return {
        "01_captioning": dict(common, run_dir=str(out / "01_captioning"), image_dir=str(assets.scope),
                              captioner_id=str(assets.blip), num_beams=4, min_length=5, max_length=20, suffix="",
                              sweep_grid={"repetition_penalty": [1.0, 1.4], "num_beams": [1, 4]}),
        "02_vae_finetune": dict(common, run_dir=str(out / "02_vae_finetune"), image_dir=str(assets.fundus_train),
                                val_image_dir=str(assets.fundus_val), model_id=str(assets.sd), patch_size=64,
                                tile_size=256, max_steps=steps(150), control_image_dir=str(assets.photos)),
        "03_sd_finetune": dict(common, run_dir=str(out / "03_sd_finetune"),
                               data_dir=str(out / "01_captioning" / "train"), model_id=str(assets.sd),
                               resolution=64, max_steps=steps(120), lr=2e-3, validate_every=steps(30),
                               checkpoint_every=steps(60), log_every=5, sample_steps=10,
                               sample_prompts=[*SCOPE_CAPTIONS.values(), PHOTO_CAPTIONS["chelsea"]]),
        "04_compare": dict(common, run_dir=str(out / "04_compare"), base_model_id=str(assets.sd),
                           finetuned_model=str(out / "03_sd_finetune"), base_vae=str(assets.sd),
                           finetuned_vae=str(out / "02_vae_finetune"), image_dir=str(assets.fundus_val),
                           control_vae=str(out / "02_vae_finetune" / "control"),
                           patch_size=64, n_patches=16, tile_size=256, n_images=16, resolution=64,
                           num_inference_steps=10, batch_size=8, fid_features="fid-helper", n_clusters=3,
                           xyz_axes={"cfg": [1.0, 7.0], "steps": [5, 10], "checkpoint": ["base", "finetuned"]},
                           clip_model_id=str(assets.clip)),
    }


def run_notebook(name: str, out: str | Path, parameters: dict, notebooks: str | Path = REPO_NOTEBOOKS) -> Path:
    """Execute notebooks/NAME.ipynb with papermill into OUT/notebooks/NAME.ipynb and return that path."""
    target = Path(out) / "notebooks" / f"{name}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(Path(notebooks) / f"{name}.ipynb"), str(target), parameters=parameters,
                               progress_bar=False, log_output=False, kernel_name="python3")
    return target


def render_html(notebook: str | Path) -> Path:
    """The executed notebook as a self-contained HTML page beside it."""
    import nbformat  # the "dev" extra: only the demo renders notebooks as HTML
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    page = notebook.with_suffix(".html")
    page.write_text(body, encoding="utf-8")
    return page


def write_index(out: str | Path, timings: dict[str, float]) -> Path:
    """OUT/index.html: each executed notebook (HTML and .ipynb) with its main pictures."""
    out = Path(out)
    rows = []
    for name in NOTEBOOKS:
        pics = sorted((out / name / "grids").glob("*.png")) if (out / name / "grids").is_dir() else []
        links = [f'<a href="notebooks/{name}.html">{name}</a> (<a href="notebooks/{name}.ipynb">.ipynb</a>)']
        if (out / name / "report.html").exists():
            links.append(f'<a href="{name}/report.html">report</a>')
        thumbs = "".join(f'<a href="{p.relative_to(out)}"><img src="{p.relative_to(out)}" title="{html.escape(p.name)}"'
                         ' style="max-height:180px;margin:4px"></a>' for p in pics)
        took = f"{timings[name]:.0f} s" if name in timings else "not run"
        rows.append(f"<tr><td>{' '.join(links)}<br><small>{took}</small></td><td>{thumbs}</td></tr>")
    page = out / "index.html"
    page.write_text("<!doctype html><meta charset='utf-8'><title>sdnb demo</title>"
                    "<h1>sdnb demo: the four notebooks on the embedded default</h1>"
                    "<p>Tiny offline models and images shipped in packages; numbers show the pipeline works, "
                    "not the quality of real SD.</p><table border=1 cellpadding=6>" + "".join(rows) + "</table>",
                    encoding="utf-8")
    return page


def run(out: str | Path = "runs/demo", notebooks: str | Path = REPO_NOTEBOOKS, scale: float = 1.0,
        only: tuple[str, ...] = NOTEBOOKS) -> Path:
    """Build the embedded default, run the notebooks in order, render them, write the index; return its path."""
    start = time.perf_counter()
    out = Path(out)
    assets = build(out / "assets")
    params = demo_parameters(assets, out, scale)
    timings: dict[str, float] = {}
    for name in only:
        if (out / name).exists():  # the demo's own previous results: replaced, since the demo starts fresh
            shutil.rmtree(out / name)
        t = time.perf_counter()
        print(f"running {name} ...", flush=True)
        executed = run_notebook(name, out, params[name], notebooks)
        render_html(executed)
        timings[name] = time.perf_counter() - t
        print(f"  {name}: {timings[name]:.1f} s", flush=True)
    index = write_index(out, timings)
    print(f"demo finished in {time.perf_counter() - start:.1f} s; open {index}")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="folder for everything the demo writes")
    parser.add_argument("--notebooks", default=str(REPO_NOTEBOOKS), help="folder holding the .ipynb files")
    parser.add_argument("--only", nargs="*", default=list(NOTEBOOKS), choices=NOTEBOOKS, help="run only these")
    args = parser.parse_args(argv)
    run(args.out, args.notebooks, only=tuple(args.only))
