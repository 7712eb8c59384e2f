"""The patch loader: patches/s from images decoded once (`PatchDataset` over `DecodedImages`) against decoding
the image for every patch, on large PNGs, and what the one-time decode costs.

    python benchmarks/bench_patches.py                        # 4 PNGs of 2048x2048, patch 512
    python benchmarks/bench_patches.py --images 2 --size 1024 --patch 256 --patches 200 --baseline-patches 8

The PNGs are scikit-image's retina photograph (1411x1411) upscaled (bicubic) to `--size`, each turned a different
way, written once into a temporary folder. Both ways produce the same thing per patch: a random crop with random
flips and 90-degree turns, as a float tensor in [-1, 1] (`sdnb.data.images.to_tensor`).

- per-patch decode: PIL open, crop (a PNG is decoded whole for any crop), RGB, flip, tensor - the leanest
  version of a loader that opens the file in `__getitem__`.
- decode once: `DecodedImages` decodes each image on first touch into an uint8 `.npy` and memory-maps it;
  `PatchDataset` then slices patches out of the map. "first touch" is that one-time cost per image (decode +
  .npy write), measured on a fresh cache; the patch rate is measured afterwards (cache files in the page cache).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from sdnb.data.images import load_rgb, to_tensor
from sdnb.vae.data import DecodedImages, PatchDataset


def write_pngs(out: Path, n: int, size: int) -> list[Path]:
    """n size x size RGB PNGs: the retina photograph upscaled, each rotated/flipped differently."""
    from skimage import data

    out.mkdir(parents=True, exist_ok=True)
    base = Image.fromarray(data.retina()).resize((size, size), Image.BICUBIC)
    ops = [None, Image.Transpose.ROTATE_90, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.ROTATE_270,
           Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    paths = []
    for i in range(n):
        image = base if ops[i % len(ops)] is None else base.transpose(ops[i % len(ops)])
        paths.append(out / f"fundus_{i}.png")
        image.save(paths[-1])
    return paths


def decode_per_patch(paths: list[Path], patch: int, rng: np.random.Generator):
    """One patch the slow way, lean: PIL open, crop (which decodes the whole PNG), RGB, then augment."""
    with Image.open(paths[int(rng.integers(len(paths)))]) as image:
        w, h = image.size
        y, x = int(rng.integers(h - patch + 1)), int(rng.integers(w - patch + 1))
        crop = np.asarray(image.crop((x, y, x + patch, y + patch)).convert("RGB"), dtype=np.uint8)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    return to_tensor(np.rot90(crop, int(rng.integers(4))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="how many PNGs")
    parser.add_argument("--size", type=int, default=2048, help="side of each PNG (px)")
    parser.add_argument("--patch", type=int, default=512, help="patch side (px)")
    parser.add_argument("--patches", type=int, default=400, help="patches drawn from the decoded-once images")
    parser.add_argument("--baseline-patches", type=int, default=16, help="patches drawn by decoding per patch")
    args = parser.parse_args()
    import os

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        paths = write_pngs(Path(tmp) / "png", args.images, args.size)
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"{args.images} PNGs of {args.size}x{args.size} ({mb:.1f} MB on disk) written in "
              f"{time.perf_counter() - start:.1f} s; patch {args.patch}; load average {os.getloadavg()[0]:.2f}")

        # the one-time cost: decode + .npy write on first touch, then a memory map
        images = DecodedImages(paths, Path(tmp) / "cache", min_side=args.patch)
        touch = []
        for i in range(len(images)):
            start = time.perf_counter()
            images[i]
            touch.append(time.perf_counter() - start)
        decode_only = []
        for p in paths:
            start = time.perf_counter()
            np.asarray(load_rgb(p), dtype=np.uint8)
            decode_only.append(time.perf_counter() - start)

        # patches from the decoded-once images (fresh DecodedImages: reopens the maps from the cache files)
        dataset = PatchDataset(DecodedImages(paths, Path(tmp) / "cache", min_side=args.patch), args.patch,
                               args.patches, seed=0, hflip=True, vflip=True, rot90=True)
        dataset[0]
        start = time.perf_counter()
        for i in range(args.patches):
            dataset[i]
        cached_s = (time.perf_counter() - start) / args.patches

        # the same patches, decoding the image every time
        rng = np.random.default_rng(0)
        per_patch = []
        for _ in range(args.baseline_patches):
            start = time.perf_counter()
            decode_per_patch(paths, args.patch, rng)
            per_patch.append(time.perf_counter() - start)
        base_s = statistics.mean(per_patch)

    first = statistics.mean(touch)
    print(f"\n{'method':<40}{'ms/patch':>10}{'patches/s':>11}{'ratio':>8}")
    print(f"{'decode the PNG for every patch':<40}{1e3 * base_s:>10.1f}{1 / base_s:>11.1f}{1.0:>7.2f}x")
    print(f"{'PatchDataset over DecodedImages':<40}{1e3 * cached_s:>10.2f}{1 / cached_s:>11.1f}{base_s / cached_s:>7.1f}x")
    print(f"\nfirst touch per image (decode + .npy write + map): {first:.2f} s (decode alone {statistics.mean(decode_only):.2f} s);"
          f" {len(paths)} images: {sum(touch):.1f} s once")
    print(f"cache on disk: {args.images * args.size * args.size * 3 / 2**20:.0f} MB of uint8; the cache pays for itself "
          f"after {sum(touch) / max(base_s - cached_s, 1e-9):.0f} patches")
    print(f"(median per-patch decode {1e3 * statistics.median(per_patch):.0f} ms over {args.baseline_patches} patches; "
          f"cached rate over {args.patches} patches, 1 torch thread; load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
