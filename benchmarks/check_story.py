"""Does the demo's story hold beyond the demo's own data? Fine-tune the embedded tiny SD with 03's demo recipe on
other image domains (none of which the demo uses for SD) and print, for each, how far the base's and the fine-tuned
samples are from the training images (`sdnb.metrics.distance_to_set`, as 04 reports it), at the same prompts and
seeds, with 95% bootstrap intervals over the prompts and seeds.

    python benchmarks/check_story.py [--assets DIR] [--steps 120] [--images 24]

Domains: fundus tiles (skimage retina), textures (skimage brick, grass, gravel, as grey photos), coins (grey
photo), and the demo's own scope tiles for reference. A check, not a test: it prints the numbers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage import data

from sdnb.compare.sd import distance_to_training_set, generate, training_set
from sdnb.demo import build, demo_parameters
from sdnb.demo.sets import SCOPE_CAPTIONS, caption_of
from sdnb.models import load_pipeline
from sdnb.sd import SDConfig, train_from_config


def _grey(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1)


DOMAINS = {
    "fundus": (lambda: data.retina()[200:1200, 200:1200], "a fundus photograph of a retina"),
    "textures": (lambda: np.concatenate([_grey(data.brick()), _grey(data.grass()), _grey(data.gravel())], 1),
                 "a grey photo of a texture"),
    "coins": (lambda: _grey(data.coins()), "a grey photo of old coins"),
}


def write_domain(name: str, out: Path, assets) -> Path:
    """12 captioned tiles of a domain (3 x 4 grid), or the demo's scope tiles with their captions."""
    out.mkdir(parents=True)
    if name == "scope":
        for f in sorted(assets.scope.glob("*.png")):
            Image.open(f).save(out / f.name)
            (out / f.name).with_suffix(".txt").write_text(caption_of(f))
        return out
    make, caption = DOMAINS[name]
    arr = make()
    h, w = arr.shape[0] // 3, arr.shape[1] // 4
    for i in range(12):
        y, x = (i // 4) * h, (i % 4) * w
        Image.fromarray(arr[y:y + h, x:x + w]).save(out / f"{name}_{i}.png")
        (out / f"{name}_{i}.txt").write_text(caption)
    return out


def check(name: str, assets, work: Path, steps: int, n: int) -> dict:
    """Fine-tune on the domain and measure base vs fine-tuned distance to its training images."""
    data_dir = write_domain(name, work / name / "data", assets)
    recipe = demo_parameters(assets, work)["03_sd_finetune"]
    cfg = SDConfig(**{**recipe, "data_dir": str(data_dir), "run_dir": str(work / name / "run"), "max_steps": steps,
                      "validate_every": 0, "checkpoint_every": 0, "checkpoint_minutes": 0, "sample_prompts": [],
                      "export_single_file": False, "gradient_checkpointing": False})
    train_from_config(cfg.to_dict())
    train, captions = training_set(data_dir, 64)
    prompts = [captions[i % len(captions)] for i in range(n)]
    samples = {k: generate(load_pipeline(ref), prompts, list(range(n)), 64, 10, 7.0, batch_size=8, progress=False)
               for k, ref in (("base", str(assets.sd)), ("finetuned", str(work / name / "run")))}
    out = {"models": {"base": {}, "finetuned": {}}, "between": {"finetuned vs base": {}}}
    distance_to_training_set(samples, train, 1000, 0, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="", help="a built embedded default (default: build one in a temp folder)")
    parser.add_argument("--steps", type=int, default=120, help="03 steps (the demo's: 120)")
    parser.add_argument("--images", type=int, default=24, help="prompts x seeds per model")
    parser.add_argument("--domains", default="scope,fundus,textures,coins")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        assets = build(args.assets or Path(tmp) / "assets", progress=False)
        print(f"scope captions: {sorted(set(SCOPE_CAPTIONS.values()))}")
        for name in args.domains.split(","):
            out = check(name, assets, Path(tmp) / "work", args.steps, args.images)
            base, tuned = (out["models"][k]["train_distance"] for k in ("base", "finetuned"))
            closer = out["between"]["finetuned vs base"]["train_distance"]
            fmt = lambda e: f"{e['value']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]"  # noqa: E731
            print(f"{name:9s} base {fmt(base)}  fine-tuned {fmt(tuned)}  closer by {fmt(closer)}  n={closer['n']}",
                  flush=True)


if __name__ == "__main__":
    main()
