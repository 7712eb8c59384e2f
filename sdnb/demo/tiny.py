"""The embedded default: tiny models in the real hub layout, and real images, written offline.

`build(out_dir)` writes, deterministically and without any download:

- ``sd-tiny/``: a tiny Stable Diffusion v1 pipeline (``model_index.json``, ``vae/``, ``unet/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that loads with
  ``StableDiffusionPipeline.from_pretrained``. Its tokenizer is the real CLIP BPE tokenizer (from the
  vocabulary shipped in open_clip); its VAE (down-sampling factor 4, 0.24 M parameters) is briefly
  trained on the natural photos below, as SD's VAE was trained on natural images, and then its UNet and
  text encoder on the captioned photos, so that the base model draws photo-like colour layouts. The VAE
  ``scaling_factor`` is 1/std of its latents on photo crops, as SD v1's 0.18215 was.
- ``blip-tiny/``: a tiny BLIP captioner with the real bert-base-uncased vocabulary, briefly trained on the
  photos and scope images, so that its captions name what is in each (from a small vocabulary).
- ``fundus/train`` and ``fundus/val``: tiles of scikit-image's retina photograph, from disjoint regions
  (boxes in ``fundus/split.json``).
- ``photos/``: natural photographs shipped in scikit-image and matplotlib, aspect ratios kept.
- ``scope/``: microscope and telescope tiles (stained tissue, green cells, galaxies), nothing like the photos:
  what the demo captions (01) and fine-tunes on (03), so that 03 and 04 show the samples moving towards them.

A stamp file written last makes a second call return at once; a half-written build is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from sdnb.demo.blip import write_blip
from sdnb.demo.clip import build_tiny_clip
from sdnb.demo.models import write_sd
from sdnb.demo.sets import PHOTO_CAPTIONS, photo_arrays, write_scope

TINY_VERSION = 4
CLIP_STEPS = 100  # contrastive steps of the tiny CLIP on the captioned photos
STAMP_NAME = ".sdnb-tiny.json"
RETINA_TRAIN_ROWS, RETINA_VAL_ROWS = (0, 940), (956, 1411)  # 16 px guard band between the regions


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the embedded default, as written by `build`."""

    root: Path
    sd: Path
    blip: Path
    fundus_train: Path
    fundus_val: Path
    photos: Path
    clip: Path
    scope: Path


def assets_at(out_dir: str | Path) -> TinyAssets:
    """The paths `build(out_dir)` writes (nothing is checked or created)."""
    root = Path(out_dir)
    return TinyAssets(root, root / "sd-tiny", root / "blip-tiny", root / "fundus" / "train",
                      root / "fundus" / "val", root / "photos", root / "clip-tiny", root / "scope")


def is_built(out_dir: str | Path, seed: int = 0) -> bool:
    """True if `out_dir` holds a complete build of this version with this seed."""
    a = assets_at(out_dir)
    stamp = a.root / STAMP_NAME
    folders = (a.sd, a.blip, a.fundus_train, a.fundus_val, a.photos, a.clip, a.scope)
    return all(p.is_dir() for p in folders) and stamp_matches(stamp, TINY_VERSION, seed)


def stamp_matches(stamp: Path, version: int, seed: int) -> bool:
    """True if the build stamp `stamp` exists and records this `version` and `seed`."""
    try:
        info = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return info.get("version") == version and info.get("seed") == seed


def build(out_dir: str | Path, seed: int = 0, force: bool = False, progress: bool = True) -> TinyAssets:
    """Write the tiny models and sample images under `out_dir` (or return at once if already there).

    The same seed gives the same files. ``force=True`` rebuilds; a build without its stamp is rebuilt.
    """
    a = assets_at(out_dir)
    if not force and is_built(a.root, seed):
        return a
    a.root.mkdir(parents=True, exist_ok=True)
    (a.root / STAMP_NAME).unlink(missing_ok=True)
    for d in (a.sd, a.blip, a.fundus_train.parent, a.photos, a.clip, a.scope):
        shutil.rmtree(d, ignore_errors=True)
    photos = write_photos(a.photos)
    write_fundus(a.fundus_train.parent)
    write_scope(a.scope)
    sd_info = write_sd(a.sd, photos, list(PHOTO_CAPTIONS.values()), seed=seed, progress=progress)
    blip_info = write_blip(a.blip, seed=seed, progress=progress)
    build_tiny_clip(a.sd / "tokenizer", a.clip, a.photos, steps=CLIP_STEPS, seed=seed)  # for the CLIP score
    stamp = {"version": TINY_VERSION, "seed": seed, **sd_info, "blip": blip_info}
    tmp = a.root / (STAMP_NAME + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2))
    tmp.replace(a.root / STAMP_NAME)
    return a


def _photo_arrays() -> dict[str, np.ndarray]:
    """Natural RGB photographs that ship in scikit-image and matplotlib (no retina, no microscopy)."""
    return photo_arrays()


def write_photos(out: Path) -> list[np.ndarray]:
    """Save the sample photographs as PNG at their own size under `out`; return them as arrays."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = _photo_arrays()
    for name, arr in arrays.items():
        Image.fromarray(arr).save(out / f"{name}.png")
    return list(arrays.values())


def _tiles(rows: tuple[int, int], width: int, n_rows: int) -> list[tuple[int, int, int, int]]:
    """Boxes (left, top, right, bottom) cutting `rows` x [0, width) into n_rows x 2 tiles."""
    ys = np.linspace(rows[0], rows[1], n_rows + 1).round().astype(int)
    xs = (0, width // 2, width)
    return [(int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1])) for r in range(n_rows) for c in range(2)]


def write_fundus(out: Path) -> dict:
    """Cut scikit-image's retina photograph into train tiles and val tiles that share no pixel.

    Train: a 2x2 grid over rows 0-940 (four ~470x705 images); val: two ~455x705 images from rows
    956-1411. The boxes go to ``out/split.json``.
    """
    retina = data.retina()
    h, w = retina.shape[:2]
    split = {"source": "skimage.data.retina()", "size": [w, h], "box": "left, top, right, bottom",
             "train": {}, "val": {}}
    for part, rows, n_rows in (("train", RETINA_TRAIN_ROWS, 2), ("val", RETINA_VAL_ROWS, 1)):
        (out / part).mkdir(parents=True, exist_ok=True)
        for i, box in enumerate(_tiles(rows, w, n_rows)):
            name = f"retina_{part}_{i}.png"
            left, top, right, bottom = box
            Image.fromarray(retina[top:bottom, left:right]).save(out / part / name)
            split[part][name] = list(box)
    (out / "split.json").write_text(json.dumps(split, indent=2))
    return split


def main(argv: list[str] | None = None) -> TinyAssets:
    """``python -m sdnb.tiny OUT_DIR [--seed N] [--force]``: build and print the paths."""
    parser = argparse.ArgumentParser(prog="python -m sdnb.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the tiny models and images into")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete build is there")
    args = parser.parse_args(argv)
    assets = build(args.out_dir, seed=args.seed, force=args.force)
    for field in ("root", "sd", "blip", "fundus_train", "fundus_val", "photos", "scope"):
        print(f"{field:13s} {getattr(assets, field)}")
    return assets
