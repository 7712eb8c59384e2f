"""The embedded default's captioned image sets: the natural photographs (what the tiny models are pre-trained on)
and "scope", microscope and telescope images that look nothing like them (what the demo captions in 01 and
fine-tunes on in 03), each with a caption from a small vocabulary that names what is in it.

All of them ship in scikit-image and matplotlib (no download).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.cbook
import numpy as np
from PIL import Image
from skimage import data

# caption of each photograph (file stem; the order of `photo_arrays`): what the tiny BLIP learns to say and the
# tiny UNet is pre-trained with
PHOTO_CAPTIONS = {
    "astronaut": "a photo of an astronaut with a flag",
    "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket on a launch pad",
    "motorcycle": "a photo of a motorcycle",
    "grace_hopper": "a photo of a woman in uniform",
    "camera": "a grey photo of a man with a camera",
}
# caption of each scope source (tiles are named SOURCE_i.png)
SCOPE_CAPTIONS = {
    "tissue": "a microscope image of stained tissue",
    "cells": "a microscope image of green cells",
    "galaxies": "a telescope image of galaxies",
}


def photo_arrays() -> dict[str, np.ndarray]:
    """Natural RGB photographs that ship in scikit-image and matplotlib (no retina, no microscopy); grey ones as RGB."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        hopper = np.asarray(im.convert("RGB"))
    return {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea(),
            "rocket": data.rocket(), "motorcycle": data.stereo_motorcycle()[0], "grace_hopper": hopper,
            "camera": np.repeat(data.camera()[..., None], 3, axis=-1)}


def scope_arrays() -> dict[str, np.ndarray]:
    """The scope sources: immunohistochemistry (skimage ``immunohistochemistry``), cells under a microscope
    (skimage ``cell``, rendered green as in fluorescence) and the Hubble deep field."""
    cell = data.cell()
    green = np.stack([cell // 4, cell, cell // 6], axis=-1).astype(np.uint8)
    return {"tissue": data.immunohistochemistry(), "cells": green, "galaxies": data.hubble_deep_field()}


def _tiles(arr: np.ndarray) -> list[np.ndarray]:
    """The 2 x 2 tiles of an image, row by row."""
    h, w = arr.shape[0] // 2, arr.shape[1] // 2
    return [arr[y:y + h, x:x + w] for y in (0, h) for x in (0, w)]


def write_scope(out: Path) -> dict[str, str]:
    """Cut each scope source into 2 x 2 tiles, saved as ``out/SOURCE_i.png``; returns file name -> caption."""
    out.mkdir(parents=True, exist_ok=True)
    captions = {}
    for name, arr in scope_arrays().items():
        for i, tile in enumerate(_tiles(arr)):
            Image.fromarray(tile).save(out / f"{name}_{i}.png")
            captions[f"{name}_{i}.png"] = SCOPE_CAPTIONS[name]
    return captions


def caption_of(path: str | Path) -> str:
    """The caption of a photo or scope tile written by `sdnb.demo.build`, from its file name."""
    stem = Path(path).stem
    return PHOTO_CAPTIONS.get(stem) or SCOPE_CAPTIONS[stem.rsplit("_", 1)[0]]


def captioned_sources() -> tuple[list[Image.Image], list[str]]:
    """What the tiny BLIP learns from: every photo and every scope tile (each shrunk to at most 256 px on the long
    side) with its caption."""
    images, captions = [], []
    tiles = {f"{name}_{i}": tile for name, arr in scope_arrays().items() for i, tile in enumerate(_tiles(arr))}
    for name, arr in {**photo_arrays(), **tiles}.items():
        im = Image.fromarray(arr)
        im.thumbnail((256, 256), Image.BICUBIC)
        images.append(im)
        captions.append(caption_of(name))
    return images, captions


def random_crops(images: list[Image.Image], per_image: int, size: int, rng: np.random.Generator,
                 min_side: float = 0.5) -> list[Image.Image]:
    """`per_image` random square crops of each image (side `min_side`-1 of its short side, random position,
    half of them mirrored), resized to `size`; image i's crops come at i * per_image, ..."""
    out = []
    for im in images:
        for _ in range(per_image):
            side = int(min(im.size) * rng.uniform(min_side, 1.0))
            x, y = int(rng.integers(im.width - side + 1)), int(rng.integers(im.height - side + 1))
            crop = im.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
            out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out
